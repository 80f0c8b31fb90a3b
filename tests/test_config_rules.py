"""Every number of the job config has bounds and every choice is a `Literal`, checked at load, on `--set`
and on assignment alike."""

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from features.typed_model import InvalidValue, constraints
from trainer.config import ConfigError, JobConfig, apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
# Text that is not a choice: paths, names, columns. Booleans need no rule.
FREE_TEXT = {"data.spec", "data.root", "encoder.preset", "encoder.cache_dir", "training.tpu", "training.model_dir",
             "export.export_dir", "evaluation.split_column", "evaluation.test_values", "ranking.position_tower_context",
             "privacy.key_file", "privacy.key_env", "privacy.forget_file", "continuous.state_dir"}


def _fields(cls, prefix=""):
    for name, field in cls.model_fields.items():
        hint = field.annotation
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            yield from _fields(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", typing.Annotated[(hint, *field.metadata)] if field.metadata else hint


def _leaf_types(hint):
    """The scalar types a field holds: itself, or a tuple's items (with their own bounds)."""
    bare = hint
    while typing.get_origin(bare) is typing.Annotated:
        bare = typing.get_args(bare)[0]
    if typing.get_origin(bare) is tuple:
        return [a for a in typing.get_args(bare) if a is not Ellipsis]
    return [hint]


def _scalar(hint):
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def test_every_number_has_bounds_and_every_choice_is_a_literal():
    unbounded, free = [], []
    for key, hint in _fields(JobConfig):
        for item in _leaf_types(hint):
            kind = _scalar(item)
            if kind in (int, float) and not constraints(item):
                unbounded.append(key)
            if kind is str and key not in FREE_TEXT:
                free.append(key)
    assert not unbounded, f"config numbers without Field(ge=/gt=/le=/lt=) bounds: {unbounded}"
    assert not free, f"config strings that are neither a Literal choice nor listed as free text: {free}"
    assert FREE_TEXT <= dict(_fields(JobConfig)).keys(), "FREE_TEXT names keys that do not exist"
    config_from_dict({})  # the defaults pass every rule


def test_assignment_is_validated_and_a_refused_value_is_not_kept():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    for section, key, value, message in [
        ("retrieval", "epochs", 0, "RetrievalConfig.epochs: expected an integer >= 1, got 0"),
        ("retrieval", "epochs", "3", "RetrievalConfig.epochs: expected int, got '3'"),
        ("retrieval", "batch_size", True, "RetrievalConfig.batch_size: expected int, got True"),
        ("ranking", "learning_rate", float("nan"), "RankingConfig.learning_rate: expected a finite number, got nan"),
        ("training", "strategy", "gpu", "TrainingConfig.strategy: expected one of ['default', 'mirrored', "),
        ("export", "recommend_k", 500, "ExportConfig.recommend_k: 500 is more than export.retrieve_n"),
    ]:
        before = getattr(getattr(cfg, section), key)
        with pytest.raises(InvalidValue) as err:
            setattr(getattr(cfg, section), key, value)
        assert str(err.value).startswith(message), str(err.value)
        assert getattr(getattr(cfg, section), key) == before
    cfg.ranking.deep_units = [32, 16]  # a list is the tuple it reads as, as in a file
    assert cfg.ranking.deep_units == (32, 16)


def test_every_shipped_config_loads():
    paths = [p for p in (ROOT / "configs").rglob("*.yaml") if "data" not in p.relative_to(ROOT / "configs").parts]
    assert len(paths) >= 10
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("item, message", [
    ("retrieval.embedding_dim=0", "--set retrieval.embedding_dim: expected an integer >= 1, got 0"),
    ("ranking.deep_units=[]", "--set ranking.deep_units: expected a non-empty list of integers >= 1, got ()"),
    ("ranking.deep_units=[8, 0]", "--set ranking.deep_units[1]: expected an integer >= 1, got 0"),
    ("retrieval.epochs=3.5", "--set retrieval.epochs: expected int, got 3.5"),
    ("retrieval.batch_size=9223372036854775808", "--set retrieval.batch_size: expected an integer that fits in int64"),
    ("data.synthetic.n_ads=0", "--set data.synthetic.n_ads: expected an integer >= 1, got 0"),
    ("data.synthetic={n_users: 0}", "--set data.synthetic.n_users: expected an integer >= 1, got 0"),
    ("retrieval.learning_rate=.nan", "--set retrieval.learning_rate: expected a finite number, got nan"),
    ("ranking.embedding_l2=.inf", "--set ranking.embedding_l2: expected a finite number, got inf"),
    ("training.strategy=gpu", "--set training.strategy: expected one of ['default', 'mirrored', 'multi_worker', "),
    ("export.recommend_k=500", "--set.export.recommend_k: 500 is more than export.retrieve_n"),
    ("ranking={epochs: 2, epochs: 3}", "--set 'ranking={epochs: 2, epochs: 3}': the value is not valid YAML: "
                                       "duplicate key 'epochs'"),
])
def test_set_values_get_the_same_rules(item, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(load_config(ROOT / "configs" / "tiny.yaml"), [item])
    assert str(err.value).startswith(message), str(err.value)


def test_cross_field_rules_hold_on_the_result_of_every_set():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    # recommend_k=200 alone breaks recommend_k <= retrieve_n; the rule is checked on the result of all --set
    out = apply_overrides(cfg, ["export.retrieve_n=300", "export.recommend_k=200"])
    assert (out.export.retrieve_n, out.export.recommend_k) == (300, 200)
    for raw, message in [
        ({"data": {"synthetic": {"n_days": 2, "cold_start_days": 2}}}, "data.synthetic.cold_start_days: 2 leaves"),
        ({"encoder": {"tiny_hidden": 30, "tiny_heads": 4}}, "encoder.tiny_hidden: 30 is not a multiple"),
        ({"data": {"source": "spec"}}, "data.spec: data.source is 'spec' but data.spec names no spec file"),
        ({"evaluation": {"protocol": "column"}}, "evaluation.split_column: protocol 'column' needs the column"),
        ({"retrieval": {"history_length": 0}, "ranking": {"history": True}}, "ranking.history: its length is"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw, "job.yaml")


def test_a_config_composes_on_its_base_and_refuses_a_looping_chain(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text(
        "retrieval: {epochs: 3, batch_size: 64, eval_ks: [10, 50]}\nranking: {epochs: 2}\n")
    (tmp_path / "job.yaml").write_text("base: common/base.yaml\nretrieval: {epochs: 5, eval_ks: [20]}\n")
    cfg = load_config(tmp_path / "job.yaml")
    assert (cfg.retrieval.epochs, cfg.retrieval.batch_size, cfg.ranking.epochs) == (5, 64, 2)  # sections merge
    assert cfg.retrieval.eval_ks == (20,)  # a list replaces the base's
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.base: expected the path"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "gone.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "gone.yaml")


def test_exponent_floats_without_a_dot_are_numbers_on_set_and_in_files(tmp_path):
    # YAML 1.1 would read them as strings, and a number key would refuse them.
    cfg = apply_overrides(JobConfig(), ["encoder.fine_tune_learning_rate=5e-05", "retrieval.learning_rate=1E-3"])
    assert cfg.encoder.fine_tune_learning_rate == 5e-05 and cfg.retrieval.learning_rate == 0.001
    path = tmp_path / "job.yaml"
    path.write_text("retrieval:\n  learning_rate: 2e-3\n")
    assert load_config(path).retrieval.learning_rate == 0.002
    assert apply_overrides(JobConfig(), ["training.model_dir='1e5'"]).training.model_dir == "1e5"  # quoted: a string
