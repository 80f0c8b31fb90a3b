"""Job configuration: pydantic v2 models loaded from YAML with `yaml.safe_load`, validated whole at load
and on every attribute assignment.

Refused, each error naming the file (or `--set`) and the dotted key: a key given twice in one mapping
(`features.typed_yaml.StrictSafeLoader`, with its line), unknown keys, wrong types (no coercion:
`"3"`, `true` or `3.5` for an int), non-finite floats, integers beyond int64, a value outside its
field's range or choices (`Field(ge=...)`, `Literal[...]`), and combinations that cannot work
together (model validators, e.g. `export.recommend_k` above `export.retrieve_n`). `apply_overrides`
sets single keys from the command line (`--set retrieval.epochs=2`), checked exactly like the file.
The model machinery (`TypedModel`, the error wording) is `features.typed_model`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, model_validator

from features.protocol import EvaluationProtocol
from features.synthetic import SyntheticConfig
from features.typed_model import SEED_MAX, Names, TypedModel, as_tuple, cross_field, explain
from serving.pseudonym import DEFAULT_KEY_ENV
from trainer.config_files import ConfigError, assign, parse_override, read_config_file

EncoderMode = Literal["frozen", "top_layers", "lora", "full"]
Baseline = Literal["most_popular", "itemknn", "ease", "id_only", "sasrec"]
Baselines = Annotated[tuple[Baseline, ...], BeforeValidator(as_tuple)]
PositiveInts = Annotated[tuple[Annotated[int, Field(ge=1)], ...], BeforeValidator(as_tuple)]


def _time_window(window: tuple[float, ...]) -> tuple[float, ...]:
    if len(window) != 2 or not window[0] < window[1]:
        raise ValueError(f"expected [start, end] with 0 <= start < end <= 1, got {list(window)}")
    return window


TimeWindow = Annotated[tuple[Annotated[float, Field(ge=0, le=1)], ...], BeforeValidator(as_tuple),
                       AfterValidator(_time_window)]


class MaskedLMConfig(TypedModel):
    """Continued masked-LM pre-training of the encoder on the ad text corpus, before two-tower training."""

    epochs: int = Field(0, ge=0)  # 0 = off
    head_epochs: int = Field(1, ge=0)  # first fit only the new masked-LM head, the encoder held fixed
    mask_rate: float = Field(0.15, gt=0, lt=1)  # share of word pieces selected for masking
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)  # ads whose text only measures masked-token accuracy before/after


class EncoderConfig(TypedModel):
    # "minilm" (bundled), "tiny" (random, small), a keras-hub preset name, or a directory in
    # keras-hub (config.json with registered_name) or Hugging Face (config.json + vocab.txt) format
    preset: str = "minilm"
    # "frozen": embeddings computed once per ad and cached; "top_layers": the last
    # `trainable_layers` transformer layers train with the towers; "lora": low-rank adapters of rank
    # `lora_rank` on every attention's query and value projections train, the rest stays frozen;
    # "full": all of BERT trains
    mode: EncoderMode = "frozen"
    trainable_layers: int = Field(2, ge=1)
    lora_rank: int = Field(8, ge=1)
    # top_layers, lora, full: the Adam learning rate of the encoder's trainable weights, a second optimizer
    # next to the towers' `retrieval.learning_rate`; 0 = no second one (the encoder steps at that rate too)
    fine_tune_learning_rate: float = Field(0.0, ge=0)
    sequence_length: int = Field(32, ge=2)
    cache_dir: str = ""  # frozen mode: reuse catalog text embeddings computed earlier for the same weights and texts
    masked_lm: MaskedLMConfig = Field(default_factory=MaskedLMConfig)
    tiny_layers: int = Field(2, ge=1)
    tiny_hidden: int = Field(64, ge=1)
    tiny_heads: int = Field(2, ge=1)
    tiny_intermediate: int = Field(128, ge=1)
    tiny_vocab_size: int = Field(4000, ge=8)  # 5 special tokens and a few words

    @model_validator(mode="after")
    def _whole_heads(self) -> EncoderConfig:
        if self.tiny_hidden % self.tiny_heads:
            raise cross_field("tiny_hidden", f"{self.tiny_hidden} is not a multiple of encoder.tiny_heads "
                              f"({self.tiny_heads})")
        return self


class RetrievalConfig(TypedModel):
    embedding_dim: int = Field(64, ge=1)
    id_embedding_dim: int = Field(32, ge=1)
    hidden_units: int = Field(128, ge=1)
    text_dim: int = Field(0, ge=0)  # > 0, frozen encoder: the towers read this many principal components of the ad text
    temperature: float = Field(0.05, gt=0)
    learning_rate: float = Field(0.003, gt=0)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(512, ge=1)
    top_k_metrics: PositiveInts = Field((10, 100), min_length=1)
    # last N positive ad ids before the event, pooled in the query tower; 0 = off
    history_length: int = Field(20, ge=0, le=1000)
    history_text: bool = True  # also pool the history ads' (frozen) text embeddings
    # > 0: a transformer encoder over the recent history, next to the mean
    history_attention_layers: int = Field(0, ge=0, le=8)
    history_attention_length: int = Field(50, ge=1)  # the most recent entries the attention encoder reads
    history_attention_heads: int = Field(2, ge=1)
    history_attention_dim: int = Field(64, ge=1)
    full_softmax_negatives: Literal["all", "seen"] = "all"  # seen: only ads with a training positive are negatives
    # mean_and_newest: also the newest entry's attended state
    history_attention_pool: Literal["mean", "mean_and_newest"] = "mean"
    # training: share of history entries hidden (denoising; regularises ids)
    history_dropout: float = Field(0.0, ge=0, lt=1)
    # "in_batch": softmax over the batch's positives (TFRS Retrieval; logQ-corrected); "full_softmax": over
    # the whole catalog each step (exact, for catalogs up to `full_softmax_max_ads`)
    loss: Literal["in_batch", "full_softmax"] = "in_batch"
    full_softmax_max_ads: int = Field(50_000, ge=1)
    # full_softmax: a query's history ads are not negatives (they are the ads evaluation.exclude_seen removes)
    exclude_history_from_loss: bool = False
    logq_correction: bool = True  # in-batch softmax corrected by log(training frequency) of each candidate
    remove_accidental_hits: bool = True  # in-batch negatives with the positive's ad id are not negatives
    num_hard_negatives: int = Field(0, ge=0)  # > 0: keep only the hardest N in-batch negatives per query; 0 = all
    user_id_dropout: float = Field(0.0, ge=0, lt=1)  # training: share of user ids replaced by the unknown-user bucket
    # training: share of ad ids replaced by the unknown-ad bucket (cold start)
    ad_id_dropout: float = Field(0.0, ge=0, lt=1)
    eval_ks: PositiveInts = Field((10, 50, 100), min_length=1)  # Recall@K / NDCG@K of the offline evaluation
    baseline_epochs: int = Field(5, ge=1)
    baseline_learning_rate: float = Field(0.1, gt=0)  # Adagrad, as in the TFRS basic retrieval tutorial
    baseline_batch_size: int = Field(8192, ge=1)


class RankingConfig(TypedModel):
    embedding_dim: int = Field(16, ge=1)
    embedding_l2: float = Field(0.0, ge=0)  # L2 penalty on embedding tables (ids are many, clicks are few)
    # > 0: embedding width of every ad categorical (0: ~1.6 * cardinality ** 0.56)
    ad_categorical_dim: int = Field(0, ge=0)
    cross_layers: int = Field(2, ge=0)
    cross_projection_dim: int = Field(0, ge=0)  # > 0: low-rank DCN-v2 cross weights (W = U V^T of this rank)
    # "stacked": cross -> deep; "parallel": cross || deep, concatenated
    architecture: Literal["stacked", "parallel"] = "stacked"
    deep_units: PositiveInts = Field((128, 64), min_length=1)
    learning_rate: float = Field(0.002, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(1024, ge=1)
    position_tower: bool = True  # shallow position tower added in training, dropped at serving
    # Context the position tower reads besides the position (when examination varies by device or
    # slot). Whatever main effect of these the tower absorbs is dropped with it at serving, so the
    # default is none: on the synthetic world device/placement in the tower cost 0.005 served AUC.
    position_tower_context: Names = ()
    ctr_loss_weight: float = Field(1.0, ge=0)  # BCE(click, pCTR) over impressions
    # BCE(click*conversion, pCTR*pCVR) over impressions (ESMM); 0: no CVR head
    ctcvr_loss_weight: float = Field(1.0, ge=0)
    # What the user did before the event (both computed from earlier events only, on the whole log):
    history: bool = False  # pool `history` (the retrieval side's earlier positives; needs retrieval.history_length)
    negative_history: bool = False  # pool the user's earlier non-clicks (the same length N)
    # how a history is pooled: "mean" of its ads' text, or "target_attention" (DIN): each history ad
    # weighted by an MLP of (history ad, candidate ad), so the summary depends on the ad being scored
    history_pool: Literal["mean", "target_attention"] = "mean"
    # target_attention's activation unit: its hidden layers' widths; what it compares ("text": the history
    # and candidate ads' unit text embeddings, "projected": the same through the model's text projection);
    # the weighted sum divided by the number of known entries ("mean") or not ("sum", as in DIN); dropout
    # on its hidden layers in training; `attention_positions`: the unit also reads a learned embedding of each
    # entry's position (most recent first); `attention_mass`: each history adds the mean of its weights
    # over its known ads as a feature (how strongly the history speaks for this ad, which the cosine
    # of the pooled vector normalises away); `attention_joint`: one unit weighs both histories, each entry
    # carrying whether it was a click as an input of the unit (instead of one unit per history)
    attention_units: PositiveInts = Field((32,), min_length=1)
    attention_keys: Literal["text", "projected"] = "projected"
    attention_scale: Literal["mean", "sum"] = "mean"
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    attention_positions: bool = False
    attention_mass: bool = False
    attention_joint: bool = False
    user_stats: bool = False  # the user's earlier events, clicks, and clicks among the last `recent_window`
    recent_window: int = Field(10, ge=1)
    item_stats: bool = False  # the ad's smoothed click rate and count over the training rows (out-of-fold in training)
    # Ids of users with few impressions (and users unseen in training, who share the OOV row):
    # training: share of user ids looked up as unknown (trains the OOV row)
    user_id_dropout: float = Field(0.0, ge=0, lt=1)
    # training: L2 on each looked-up user/ad id row, divided by its training count
    id_frequency_l2: float = Field(0.0, ge=0)
    # The latest share (by time) of the training rows: a first fit on the earlier rows early-stops on
    # its gAUC (patience: training.early_stopping_patience) and the calibrator is fitted on that fit's
    # out-of-sample logits there; the served model then trains on all rows for the chosen epochs.
    # 0: one fit on all rows for `epochs`, uncalibrated.
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    # "beta" | "platt": smooth, strictly increasing maps; "isotonic": knots (near-flat steps); "none".
    calibration: Literal["beta", "platt", "isotonic", "none"] = "beta"
    calibration_half_life: float = Field(0.25, ge=0)  # recency weights: halve every this share of the calibration rows
    # latest share of them the map must improve (ECE) to be applied
    calibration_check_fraction: float = Field(0.5, gt=0, lt=1)
    calibration_knots: int = Field(64, ge=4)
    # Data with no negatives of its own (implicit labels: every row a positive): per positive, this
    # many ads drawn uniformly from the ads seen in training that the user has no positive with,
    # for training and for the held-out metrics. Such data with 0 is refused (ranking needs negatives).
    sampled_negatives: int = Field(4, ge=0, le=1000)


class TrainingConfig(TypedModel):
    # trainer.strategy.STRATEGIES
    strategy: Literal["default", "mirrored", "multi_worker", "tpu", "parameter_server"] = "default"
    tpu: str = ""  # TPU name or address for strategy "tpu" ("" = the local TPU VM)
    # strategy "parameter_server": a variable of at least this many bytes is split into shards of at least
    # this size, at most one per ps task (embedding tables larger than one machine's memory)
    ps_min_shard_bytes: int = Field(256 << 10, ge=1024, le=1 << 40)
    seed: int = Field(42, ge=0, le=SEED_MAX)
    early_stopping_patience: int = Field(2, ge=0)
    mixed_precision: Literal["none", "mixed_bfloat16", "mixed_float16"] = "none"  # mixed_float16: with loss scaling
    steps_per_execution: int = Field(1, ge=1)
    jit_compile: bool = False  # XLA-compile the models' dense cores (lookups stay uncompiled)
    backup_every_steps: int = Field(0, ge=0)  # BackupAndRestore frequency in steps; 0 = every epoch
    model_dir: str = "runs/demo"


class ExportConfig(TypedModel):
    export_dir: str = "runs/demo/models"
    top_k: int = Field(100, ge=1)  # retrieval model output size
    retrieve_n: int = Field(100, ge=1)  # recommender: candidates retrieved before ranking
    recommend_k: int = Field(20, ge=1)  # recommender: ads returned per request
    # recommender order: "pctr", "ecpm" (bid x pCTR) or "cpa" (bid x pCTR x pCVR)
    objective: Literal["pctr", "ecpm", "cpa"] = "pctr"
    # ranking and recommender: also return why each ad scored as it did (trainer/explain.py); off saves
    # the network's extra runs over rows x (history width + feature groups) per request
    explanations: bool = True
    # The retrieval and recommender graphs' top-K index (trainer/ivf_index.py): "brute_force" scores
    # every ad (exact); "ivf" k-means partitions at export time and scores the `nprobe` nearest.
    index: Literal["brute_force", "ivf"] = "brute_force"
    ivf_partitions: int = Field(0, ge=0, le=1_000_000)  # 0 = ~4 sqrt(catalog size), at most one per ad
    nprobe: int = Field(32, ge=1, le=1_000_000)  # partitions scored per query (widened when k needs more ads)
    ivf_storage: Literal["float32", "bfloat16", "int8"] = "float32"  # int8: per-vector symmetric scale
    ivf_iterations: int = Field(10, ge=1, le=100)  # k-means Lloyd iterations

    @model_validator(mode="after")
    def _k_of_n(self) -> ExportConfig:  # the recommender graph ranks only retrieve_n candidates
        if self.recommend_k > self.retrieve_n:
            raise cross_field("recommend_k", f"{self.recommend_k} is more than export.retrieve_n {self.retrieve_n}: "
                              "the recommender ranks retrieve_n candidates and returns k of them")
        if self.ivf_partitions and self.nprobe > self.ivf_partitions:
            raise cross_field("nprobe", f"{self.nprobe} is more than export.ivf_partitions {self.ivf_partitions}: "
                              "a query cannot probe more partitions than the index has")
        return self


MAX_HASH_BUCKETS = 1 << 28  # rows of one hashed embedding table


class StreamConfig(TypedModel):
    """Streaming input (docs/data.md#streaming): the spec's log files are read by tf.data chunk by chunk
    and never held whole; vocabularies come from one streaming pass (or hashing, `hash_buckets`);
    multi-worker jobs give each worker whole files."""

    enabled: bool = False
    # feature -> bucket count: ids hashed into that many embedding rows instead of a vocabulary (an
    # unbounded id space: user ids, say); query string features only (user id, user/context categoricals)
    hash_buckets: dict[str, Annotated[int, Field(ge=1, le=MAX_HASH_BUCKETS)]] = Field(default_factory=dict)
    shuffle_buffer: int = Field(10_000, ge=0, le=10_000_000)  # rows mixed in a pool before batching (0: file order)
    cycle_length: int = Field(2, ge=1, le=64)  # files read at a time, a batch-sized slice of each in turn


class DataConfig(TypedModel):
    source: Literal["synthetic", "spec"] = "synthetic"  # "synthetic" | "spec" (real logs through a YAML data spec)
    time_window: TimeWindow = (0.0, 1.0)  # share of the log's time span to use, [start, end]
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    spec: str = ""  # source "spec": path of the data spec (configs/data/*.yaml), relative to the CWD
    root: str = ""  # source "spec": overrides the spec's data directory when set
    # The catalog's creative vectors (a spec's `columns.ad_vector`, the synthetic world's `creative`):
    # "use" fuses them in both ad towers; "ignore" leaves them out (a text-only run on the same data).
    ad_vectors: Literal["use", "ignore"] = "use"
    stream: StreamConfig = Field(default_factory=StreamConfig)

    @model_validator(mode="after")
    def _spec_named(self) -> DataConfig:
        if self.source == "spec" and not self.spec:
            raise cross_field("spec", "data.source is 'spec' but data.spec names no spec file")
        if self.stream.enabled and self.source != "spec":
            raise cross_field("stream", "data.stream.enabled reads a data spec's log files: set data.source "
                                        "'spec' and data.spec (the synthetic world is generated in memory)")
        return self


class DPConfig(TypedModel):
    """DP-SGD for the retrieval model (trainer/dp.py, docs/training.md#differential-privacy): each training
    row's gradient clipped to `l2_clip`, Gaussian noise of `noise_multiplier * l2_clip` added to the sum,
    epsilon at `delta` reported by an RDP accountant. The ranking stage is not trained under it."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0, le=100)
    l2_clip: float = Field(1.0, gt=0, le=1e6)
    delta: float = Field(1e-6, gt=0, lt=1)  # must also be below 1 / training rows


class PrivacyConfig(TypedModel):
    """Pseudonymisation at ingest and data minimisation (docs/data.md#privacy).

    With `pseudonymize` the user ids, and the columns a data spec marks `pii`, are replaced by
    keyed pseudonyms (HMAC-SHA256, `serving.pseudonym`) before anything else reads them. The key:
    `key_file` when set, else the environment variable `key_env` when set, else a random key the
    job writes once to `pseudonym.key` beside `training.model_dir` (never inside it or the export
    directory) and reuses, `key_file` then naming it. The key itself is never written to an artifact.
    Users named to `adrec forget` are listed in `forget_file` and left out of every later training.
    """

    pseudonymize: bool = True
    key_file: str = ""
    key_env: str = Field(DEFAULT_KEY_ENV, min_length=1)
    # user ids with fewer training rows, and user categorical values held by fewer distinct users,
    # are left out of the vocabularies (looked up as OOV); 1 keeps every value
    min_count: int = Field(1, ge=1)
    # `adrec forget`'s list of forgotten users (keyed pseudonyms; trainer/forget.py); "": forgotten_users.jsonl
    # beside training.model_dir. Never inside the model or export directory.
    forget_file: str = ""
    dp: DPConfig = Field(default_factory=DPConfig)


class ContinuousConfig(TypedModel):
    """`adrec continuous` (docs/training.md#continuous-training): each new day partition is held out,
    a candidate warm-started from the served version trains on the `window_days` before it, and is
    published only when it is no worse than the served version on that day by more than the margins."""

    window_days: int = Field(3, ge=1)  # training days before the held-out day
    recall_k: int = Field(0, ge=0)  # the gate's Recall@K, at most export.top_k; 0: export.top_k
    recall_margin: float = Field(0.01, ge=0, le=1)  # the candidate may be this much lower (absolute) and pass
    auc_margin: float = Field(0.01, ge=0, le=1)  # the same for the ranking AUC
    state_dir: str = ""  # state, training runs, staged and rejected versions; "": <training.model_dir>/continuous


class EvaluationConfig(EvaluationProtocol):
    """The evaluation protocol (features.protocol) and the retrieval baselines compared with the model.

    With `validation_fraction > 0` a validation split is carved from the training rows by the same
    protocol: the model early-stops on it and each baseline picks its hyperparameters on it; with
    `refit` every method then trains again on all training rows, otherwise all keep the validation
    rows out of training.
    """

    validation_fraction: float = Field(0.0, ge=0, lt=1)
    baselines: Baselines = ("most_popular", "id_only")
    refit: bool = False


class JobConfig(TypedModel):
    data: DataConfig = Field(default_factory=DataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    continuous: ContinuousConfig = Field(default_factory=ContinuousConfig)

    @model_validator(mode="after")
    def _sections_fit_together(self) -> JobConfig:
        if self.retrieval.loss == "full_softmax" and self.encoder.mode != "frozen":
            raise cross_field("retrieval.loss", "'full_softmax' embeds the whole catalog every step, which needs "
                              "encoder.mode 'frozen' (cached text); use 'in_batch' to fine-tune the encoder")
        for key in ("history", "negative_history"):
            if getattr(self.ranking, key) and not self.retrieval.history_length:
                raise cross_field(f"ranking.{key}", "its length is retrieval.history_length, which is 0")
        if self.privacy.dp.enabled:
            self._dp_fits()
        if self.training.strategy == "parameter_server":
            self._parameter_servers_fit()
        if self.continuous.recall_k > self.export.top_k:  # 0 (the default) stands for top_k
            raise cross_field("continuous.recall_k", f"{self.continuous.recall_k} is more than export.top_k "
                              f"{self.export.top_k}, the ads the served retrieval model returns")
        return self

    def _parameter_servers_fit(self) -> None:
        """What asynchronous parameter-server training does not run (docs/training.md#parameter-servers):
        Keras refuses batch-level callbacks under it, the encoder trains only with synchronous
        strategies, and the rest is untested there; each refused before any work."""
        rules = (
            ("encoder.mode", self.encoder.mode == "frozen",
             "must be 'frozen': the BERT encoder trains only under synchronous strategies"),
            ("training.mixed_precision", self.training.mixed_precision == "none", "must be 'none'"),
            ("training.jit_compile", not self.training.jit_compile, "must be false"),
            ("training.steps_per_execution", self.training.steps_per_execution == 1, "must be 1"),
            ("training.backup_every_steps", self.training.backup_every_steps == 0,
             "must be 0 (backups every epoch): Keras runs no batch-level callbacks under parameter servers"),
            ("ranking.item_stats", not self.ranking.item_stats,
             "must be false: its click tables are read by 2-D index, which a sharded table does not take"),
            ("evaluation.validation_fraction", self.evaluation.validation_fraction == 0,
             "must be 0: validation during fit is not run under parameter servers here"),
        )
        for key, ok, why in rules:
            if not ok:
                raise cross_field("training.strategy", f"'parameter_server': {key} {why}")

    def _dp_fits(self) -> None:
        """What DP-SGD's guarantee needs of the rest of the job (trainer/dp.py says why each)."""
        rules = (
            ("retrieval.loss", self.retrieval.loss == "full_softmax",
             "must be 'full_softmax': under an in-batch softmax each row is a negative of the others, so one "
             "row's influence is not bounded by its own clipped gradient"),
            ("retrieval.full_softmax_negatives", self.retrieval.full_softmax_negatives == "all",
             "must be 'all': 'seen' picks the negatives by which ads have training positives, outside the clipping"),
            ("training.strategy", self.training.strategy == "default",
             "must be 'default': the noise is added once per global batch, on one device"),
            ("training.mixed_precision", self.training.mixed_precision == "none",
             "must be 'none': per-row gradients and their norms are computed in float32"),
            ("training.jit_compile", not self.training.jit_compile, "must be false under privacy.dp"),
            ("evaluation.validation_fraction", self.evaluation.validation_fraction == 0,
             "must be 0: early stopping on held-out training rows would choose the epoch outside the accountant"),
        )
        for key, ok, why in rules:
            if not ok:
                raise cross_field("privacy.dp.enabled", f"{key} {why}")


def config_from_dict(raw: dict | None, where: str = "config") -> JobConfig:
    """A JobConfig from plain YAML values, validated whole: types, every field's range or choices, then
    the rules across fields. Errors name `where` (the file) and the dotted key."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(explain(err, JobConfig, where)) from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """A config file (composed on its `base:` chain, see `read_config_file`), then `overrides`
    (`section.key=value`, see `apply_overrides`) on top."""
    cfg = config_from_dict(read_config_file(path), str(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: JobConfig, overrides: Iterable[str]) -> JobConfig:
    """A copy of `cfg` with each `section.key=value` applied in order.

    The value is parsed with `yaml.safe_load` (`2`, `0.5`, `true`, `[10, 50]`, `{epochs: 2}`);
    keys may nest (`encoder.masked_lm.epochs=2`); a mapping onto a section sets each of its keys.
    Each value is type- and range-checked as in a config file; errors name the `--set` key.
    """
    raw = config_to_dict(cfg)
    for item in overrides:
        path, value = parse_override(item)
        assign(raw, JobConfig, path, value)
    return config_from_dict(raw, "--set")  # the whole again: rules across fields (errors: "--set.<key>")


def config_to_dict(cfg: BaseModel) -> dict:
    """Plain values (lists for tuples): what YAML and JSON write."""
    return cfg.model_dump(mode="json")
