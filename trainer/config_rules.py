"""The rules a job config's values must meet: one per number and choice field (`_RULES`), and the
combinations of valid values that cannot work together (`_cross_field_problems`).

`trainer.config` applies them when a config is loaded or overridden; they live here so that the
config's shape (the dataclasses) and its rules each read on their own.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING

from features.protocol import HISTORY_AT_TEST, SESSION_CONTEXT
from features.split import PROTOCOLS

if TYPE_CHECKING:
    from trainer.config import JobConfig

ENCODER_MODES = ("frozen", "top_layers", "full")
BASELINES = ("most_popular", "itemknn", "ease", "id_only", "sasrec")


# Rules for values that have the right type but cannot mean anything (or crash later, deep in
# TensorFlow: `retrieval.embedding_dim: 0` aborts inside oneDNN). Every int / float field and every
# choice field of JobConfig has one, keyed by its dotted path (tests/test_config_rules.py checks that
# none is missing); free-text fields (paths, preset names, column names) and booleans have none.
# Floats must also be finite (`.nan` / `.inf` are refused before the rules run).
Rule = tuple[typing.Callable[[typing.Any], bool], str]


def _int_at_least(n: int) -> Rule:
    return (lambda v: v >= n, f"an integer >= {n}")


def _int_in(lo: int, hi: int) -> Rule:
    return (lambda v: lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def _positive() -> Rule:
    return (lambda v: v > 0, "a number > 0")


def _non_negative() -> Rule:
    return (lambda v: v >= 0, "a number >= 0")


def _fraction(closed_low: bool = True, closed_high: bool = False) -> Rule:
    low, high = ("[" if closed_low else "("), ("]" if closed_high else ")")
    return (lambda v: (0 <= v if closed_low else 0 < v) and (v <= 1 if closed_high else v < 1),
            f"a fraction in {low}0, 1{high}")


def _one_of(choices: tuple[str, ...], expected: str | None = None) -> Rule:
    return (lambda v: v in choices, expected or f"one of {list(choices)}")


def _ints_at_least(n: int, allow_empty: bool = False) -> Rule:
    what = f"integers >= {n}" if allow_empty else f"a non-empty list of integers >= {n}"
    return (lambda v: (allow_empty or len(v) > 0) and all(k >= n for k in v), what)


SEED = _int_in(0, 2**32 - 1)  # numpy / Keras seeds
TRAINING_STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")  # trainer.strategy.STRATEGIES
MIXED_PRECISION = ("none", "mixed_bfloat16", "mixed_float16")
DATA_SOURCES = ("synthetic", "spec")
OBJECTIVES = ("pctr", "ecpm", "cpa")

_RULES: dict[str, Rule] = {
    # data
    "data.source": _one_of(DATA_SOURCES),
    "data.time_window": (lambda v: len(v) == 2 and 0.0 <= v[0] < v[1] <= 1.0,
                         "[start, end] with 0 <= start < end <= 1"),
    "data.synthetic.seed": SEED,
    **{f"data.synthetic.{k}": _int_at_least(1)
       for k in ("n_users", "n_advertisers", "n_ads", "n_impressions", "n_days", "max_position", "n_regions")},
    "data.synthetic.cold_start_share": _fraction(),
    "data.synthetic.cold_start_days": _int_at_least(0),
    "data.synthetic.targeted_share": _fraction(closed_high=True),
    # encoder
    "encoder.mode": _one_of(ENCODER_MODES, "one of " + ", ".join(ENCODER_MODES)),
    "encoder.trainable_layers": _int_at_least(1),
    "encoder.sequence_length": _int_at_least(2),
    **{f"encoder.{k}": _int_at_least(1) for k in ("tiny_layers", "tiny_hidden", "tiny_heads", "tiny_intermediate")},
    "encoder.tiny_vocab_size": _int_at_least(8),  # 5 special tokens and a few words
    "encoder.masked_lm.epochs": _int_at_least(0),
    "encoder.masked_lm.head_epochs": _int_at_least(0),
    "encoder.masked_lm.mask_rate": _fraction(closed_low=False),
    "encoder.masked_lm.learning_rate": _positive(),
    "encoder.masked_lm.batch_size": _int_at_least(1),
    "encoder.masked_lm.holdout_fraction": _fraction(closed_low=False),
    # retrieval
    **{f"retrieval.{k}": _int_at_least(1) for k in ("embedding_dim", "id_embedding_dim", "hidden_units", "epochs",
                                                    "batch_size", "full_softmax_max_ads", "history_attention_length",
                                                    "history_attention_heads", "history_attention_dim",
                                                    "baseline_epochs", "baseline_batch_size")},
    "retrieval.text_dim": _int_at_least(0),
    "retrieval.temperature": _positive(),
    "retrieval.learning_rate": _positive(),
    "retrieval.baseline_learning_rate": _positive(),
    "retrieval.top_k_metrics": _ints_at_least(1),
    "retrieval.eval_ks": (lambda v: len(v) > 0 and all(k >= 1 for k in v), "integers >= 1"),
    "retrieval.history_length": _int_in(0, 1000),
    "retrieval.history_attention_layers": _int_in(0, 8),
    "retrieval.full_softmax_negatives": _one_of(("all", "seen"), "'all' or 'seen'"),
    "retrieval.history_attention_pool": _one_of(("mean", "mean_and_newest"), "'mean' or 'mean_and_newest'"),
    "retrieval.num_hard_negatives": _int_at_least(0),
    "retrieval.loss": _one_of(("in_batch", "full_softmax"), "'in_batch' or 'full_softmax'"),
    **{f"retrieval.{k}": _fraction() for k in ("history_dropout", "user_id_dropout", "ad_id_dropout")},
    # ranking
    **{f"ranking.{k}": _int_at_least(1) for k in ("embedding_dim", "epochs", "batch_size", "recent_window")},
    **{f"ranking.{k}": _int_at_least(0) for k in ("cross_layers", "cross_projection_dim", "ad_categorical_dim")},
    "ranking.deep_units": _ints_at_least(1),
    "ranking.architecture": _one_of(("stacked", "parallel"), "'stacked' or 'parallel'"),
    "ranking.learning_rate": _positive(),
    **{f"ranking.{k}": _non_negative() for k in ("embedding_l2", "id_frequency_l2", "ctr_loss_weight",
                                                 "ctcvr_loss_weight", "calibration_half_life")},
    **{f"ranking.{k}": _fraction() for k in ("validation_fraction", "user_id_dropout")},
    "ranking.calibration": _one_of(("beta", "platt", "isotonic", "none"), "'beta', 'platt', 'isotonic' or 'none'"),
    "ranking.calibration_check_fraction": _fraction(closed_low=False),
    "ranking.calibration_knots": _int_at_least(4),
    "ranking.sampled_negatives": _int_in(0, 1000),
    # training
    "training.strategy": _one_of(TRAINING_STRATEGIES),
    "training.seed": SEED,
    "training.early_stopping_patience": _int_at_least(0),
    "training.mixed_precision": _one_of(MIXED_PRECISION),
    "training.steps_per_execution": _int_at_least(1),
    "training.backup_every_steps": _int_at_least(0),
    # evaluation (EvaluationProtocol.check words the same rules; these run first)
    "evaluation.protocol": _one_of(PROTOCOLS),
    "evaluation.test_fraction": _fraction(closed_low=False),
    "evaluation.seed": SEED,
    "evaluation.n_last": _int_at_least(1),
    "evaluation.history_at_test": _one_of(HISTORY_AT_TEST),
    "evaluation.validation_fraction": _fraction(),
    "evaluation.session_context": _one_of(SESSION_CONTEXT),
    # export
    **{f"export.{k}": _int_at_least(1) for k in ("top_k", "retrieve_n", "recommend_k")},
    "export.objective": _one_of(OBJECTIVES, "'pctr', 'ecpm' or 'cpa'"),
}


def _check_value(dotted: str, value) -> str | None:
    """What is wrong with `value` at `dotted` (finiteness, then its rule), or None."""
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        return f"expected a finite number, got {value!r}"
    if any(isinstance(v, int) and not -2**63 <= v < 2**63 for v in items):
        return f"expected an integer that fits in int64, got {value!r}"
    rule = _RULES.get(dotted)
    if rule and not rule[0](value):
        return f"expected {rule[1]}, got {value!r}"
    return None


def _leaves(obj, prefix: str = ""):
    """(dotted path, value) of every non-section field of a config dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _cross_field_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """(dotted key, problem) for combinations of valid values that cannot work together."""
    problems = []
    export, synthetic, encoder = cfg.export, cfg.data.synthetic, cfg.encoder
    if export.recommend_k > export.retrieve_n:  # the recommender graph ranks only retrieve_n candidates
        problems.append(("export.recommend_k", f"{export.recommend_k} is more than export.retrieve_n "
                         f"{export.retrieve_n}: the recommender ranks retrieve_n candidates and returns k of them"))
    if synthetic.cold_start_days >= synthetic.n_days:
        problems.append(("data.synthetic.cold_start_days", f"{synthetic.cold_start_days} leaves no day before the "
                         f"cold-start ads launch; expected fewer than data.synthetic.n_days ({synthetic.n_days})"))
    if encoder.tiny_hidden % encoder.tiny_heads:
        problems.append(("encoder.tiny_hidden", f"{encoder.tiny_hidden} is not a multiple of encoder.tiny_heads "
                         f"({encoder.tiny_heads})"))
    if cfg.data.source == "spec" and not cfg.data.spec:
        problems.append(("data.spec", "data.source is 'spec' but data.spec names no spec file"))
    unknown = [b for b in cfg.evaluation.baselines if b not in BASELINES]
    if unknown:
        problems.append(("evaluation.baselines", f"unknown {unknown}; known: {list(BASELINES)}"))
    if cfg.retrieval.loss == "full_softmax" and cfg.encoder.mode != "frozen":
        problems.append(("retrieval.loss", "'full_softmax' embeds the whole catalog every step, which "
                         "needs encoder.mode 'frozen' (cached text); use 'in_batch' to fine-tune the encoder"))
    for key in ("history", "negative_history"):
        if getattr(cfg.ranking, key) and not cfg.retrieval.history_length:
            problems.append((f"ranking.{key}", "its length is retrieval.history_length, which is 0"))
    return problems
