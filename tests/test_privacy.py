"""Pseudonymisation at ingest, minimisation and the keyed client (docs/data.md#privacy).

The artifact scan reads every byte of every file a tiny job with export writes (model directory:
config, metrics, vocabularies, checkpoints, TensorBoard logs; export directory: SavedModels,
assets, warmup records, server configs) for a sample of the raw user ids and for the key. The same
scan over a job with `privacy.pseudonymize: false` must find the ids, or it could not fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from features.spec import DataSpecError, spec_from_dict
from features.synthetic import generate_world
from features.vocab import build_vocabularies
from serving.client import RecommendationClient, RequestError
from serving.pseudonym import (
    DEFAULT_KEY_ENV,
    PseudonymKeyError,
    is_pseudonym,
    key_id,
    pseudonym,
    read_key_file,
)
from serving.server import EmbeddedModelServer, discover_models
from tests.conftest import ROOT, tiny_config

ENV_KEY = os.environ[DEFAULT_KEY_ENV]  # conftest: the key of every test job and client
USER = {"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}
COMPRESSED = (b"\x1f\x8b", b"PK\x03\x04", b"\x28\xb5\x2f\xfd")  # gzip, zip, zstd: a byte scan would miss ids


def _sample_raw_ids(cfg, n: int = 40) -> list[str]:
    """Raw user ids with many rows in the synthetic world: every job keeps them in its vocabularies."""
    logs = generate_world(cfg.data.synthetic).logs
    return logs["user_id"].value_counts().index[:n].tolist()


def _scan(dirs: list[Path], needles: list[bytes]) -> dict[str, list[str]]:
    """{needle: files holding it} over every file under `dirs`; refuses compressed files."""
    found: dict[str, list[str]] = {}
    files = [p for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()]
    assert len(files) > 20, files  # the job wrote what it writes
    for path in files:
        data = path.read_bytes()
        assert not data.startswith(COMPRESSED), f"{path} is compressed: the byte scan cannot read it"
        for needle in needles:
            if needle in data:
                found.setdefault(needle.decode(), []).append(str(path))
    return found


@pytest.fixture(scope="module")
def plain_job(tmp_path_factory):
    """A tiny job with export and pseudonymisation off: the control the scan must find ids in."""
    from trainer.task import train_and_export

    tmp = tmp_path_factory.mktemp("plain")
    cfg = tiny_config(tmp, privacy={"pseudonymize": False})
    trained, _ = train_and_export(cfg, export=True, progress=False)
    return trained


def test_no_raw_user_id_or_key_in_any_artifact(exported_tiny, trained_tiny, plain_job):
    cfg = trained_tiny.config
    raw = _sample_raw_ids(cfg)
    needles = [u.encode() for u in raw]
    dirs = [Path(cfg.training.model_dir), Path(cfg.export.export_dir)]
    assert _scan(dirs, needles + [ENV_KEY.encode(), ENV_KEY.encode().hex().encode()]) == {}
    # the ids are in the job as pseudonyms: what the scan would have found is there, hashed
    assert {pseudonym(u, ENV_KEY.encode()) for u in raw} <= set(trained_tiny.vocabularies["user_id"])

    plain = plain_job.config
    found = _scan([Path(plain.training.model_dir), Path(plain.export.export_dir)], needles)
    assert set(found) == set(raw)  # every sampled id, in the plain job's files ...
    where = {Path(f).relative_to(Path(plain.training.model_dir).parent).parts[1] for fs in found.values() for f in fs}
    assert {"vocabularies.json", "retrieval", "ranking", "recommender"} <= where  # ... of each kind


def test_config_and_exports_say_where_the_key_is_never_what(exported_tiny, trained_tiny):
    cfg = trained_tiny.config
    recorded = json.loads((Path(cfg.training.model_dir) / "config.json").read_text())["privacy"]
    assert recorded == {"pseudonymize": True, "key_file": "", "key_env": DEFAULT_KEY_ENV, "min_count": 1,
                        "forget_file": "", "dp": {"enabled": False, "noise_multiplier": 1.0, "l2_clip": 1.0,
                                                  "delta": 1e-6}}
    note = json.loads((Path(cfg.training.model_dir) / "privacy.json").read_text())
    assert note["pseudonymized_inputs"] == ["user_id"] and note["key_id"] == key_id(ENV_KEY.encode())
    for path in exported_tiny.paths.values():
        meta = json.loads((path / "assets.extra" / "adrec.json").read_text())
        assert meta["privacy"] == note


def test_client_hashes_the_callers_id_end_to_end(exported_tiny, trained_tiny):
    key = ENV_KEY.encode()
    hashed = pseudonym(USER["user_id"], key)
    assert hashed in trained_tiny.vocabularies["user_id"]  # a trained user, not the OOV row
    base = exported_tiny.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as server:
        with RecommendationClient(server.address, pseudonym_key=key, key_env=None) as keyed, \
                RecommendationClient(server.address, key_env=None) as keyless:
            by_raw = keyed.recommend(USER, CONTEXT, k=5)
            by_pseudonym = keyless.recommend({**USER, "user_id": hashed}, CONTEXT, k=5)
            assert by_raw == by_pseudonym
            assert keyed.recommend({**USER, "user_id": hashed}, CONTEXT, k=5) == by_raw  # hashing twice: once
            unknown = keyless.recommend({**USER, "user_id": pseudonym("nobody", key)}, CONTEXT, k=5)
            assert [a.scores["retrieval_scores"] for a in unknown] != [a.scores["retrieval_scores"] for a in by_raw]
            calls = keyless.calls
            with pytest.raises(RequestError, match="no key"):
                keyless.recommend(USER, CONTEXT, k=5)
            assert keyless.calls == calls  # refused before anything was sent
        with RecommendationClient(server.address, pseudonym_key=b"another-key-0123456789", key_env=None) as wrong, \
                pytest.raises(RequestError, match="another key"):
            wrong.recommend(USER, CONTEXT, k=5)


def test_a_keyed_client_is_refused_by_a_model_of_plain_ids(plain_job):
    base = Path(plain_job.config.export.export_dir)
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as server:
        with RecommendationClient(server.address, key_env=None) as plain:
            assert len(plain.recommend(USER, CONTEXT, k=3)) == 3  # raw ids, as the model was trained
        with RecommendationClient(server.address, pseudonym_key=ENV_KEY) as keyed, \
                pytest.raises(RequestError, match="plain user ids"):
            keyed.recommend(USER, CONTEXT, k=3)


def test_cli_recommend_takes_the_key_file(exported_tiny, tmp_path, capsys, monkeypatch):
    from trainer.cli import main

    key_file = tmp_path / "key"
    key_file.write_text(ENV_KEY + "\n")
    monkeypatch.delenv(DEFAULT_KEY_ENV)
    base = exported_tiny.paths["recommender"].parent.parent
    argv = ["recommend", "--user", "u00001", "-k", "3"] + [f"--feature={k}={v}" for k, v in
                                                         {**USER, **CONTEXT}.items() if k != "user_id"]
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as server:
        assert main([*argv, "--address", server.address]) == 1
        assert "no key" in capsys.readouterr().err
        assert main([*argv, "--address", server.address, "--key-file", str(key_file)]) == 0
        with RecommendationClient(server.address, pseudonym_key=ENV_KEY) as client:
            expected = [a.ad_id for a in client.recommend(USER, CONTEXT, k=3)]
    shown = capsys.readouterr().out
    assert [line.split()[1] for line in shown.splitlines()[1:]] == expected


def test_the_key_comes_from_a_file_or_the_environment_or_is_made_once(tmp_path, monkeypatch):
    from trainer.privacy import job_key

    monkeypatch.delenv(DEFAULT_KEY_ENV)
    cfg = tiny_config(tmp_path)
    key = job_key(cfg)  # none configured: a random key beside the model dir, named in the config
    made = tmp_path / "pseudonym.key"
    assert cfg.privacy.key_file == str(made) and read_key_file(made) == key and len(key) == 64
    assert made.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert job_key(tiny_config(tmp_path)) == key  # reused, not replaced
    monkeypatch.setenv(DEFAULT_KEY_ENV, "from-the-environment-0123")
    assert job_key(tiny_config(tmp_path)) == b"from-the-environment-0123"
    monkeypatch.setenv(DEFAULT_KEY_ENV, "")
    with pytest.raises(PseudonymKeyError, match="empty"):
        job_key(tiny_config(tmp_path))
    for text, message in (("", "empty"), ("short", "at least 16")):
        (tmp_path / "bad.key").write_text(text)
        with pytest.raises(PseudonymKeyError, match=message):
            job_key(tiny_config(tmp_path, privacy={"key_file": str(tmp_path / "bad.key")}))
    with pytest.raises(PseudonymKeyError, match="does not exist"):
        job_key(tiny_config(tmp_path, privacy={"key_file": str(tmp_path / "missing.key")}))
    inside = tmp_path / "run" / "k"
    inside.parent.mkdir()
    inside.write_text("x" * 32)
    with pytest.raises(PseudonymKeyError, match="inside training.model_dir"):
        job_key(tiny_config(tmp_path, privacy={"key_file": str(inside)}))


def test_pseudonyms_are_keyed_stable_and_idempotent():
    a, b = b"k" * 16, b"j" * 16
    assert is_pseudonym(pseudonym("u00001", a)) and pseudonym("u00001", a) == pseudonym("u00001", a)
    assert pseudonym("u00001", a) != pseudonym("u00001", b) != pseudonym("u00002", b)
    assert pseudonym(pseudonym("u00001", a), b) == pseudonym("u00001", a)  # already a pseudonym: kept
    assert pseudonym("", a) == ""  # "not known" stays unknown
    assert key_id(a) != key_id(b) and a.hex() not in key_id(a)


def test_spec_pii_columns_are_pseudonymised_at_ingest(tmp_path):
    from trainer.prepare import load_job_data

    cfg = tiny_config(tmp_path, data={"source": "spec", "spec": str(ROOT / "configs/data/ml-100k.yaml"),
                                      "root": str(ROOT / "tests/fixtures/ml-100k")})
    catalog, logs, schema = load_job_data(cfg)
    key = ENV_KEY.encode()
    assert schema.extra["privacy"]["pseudonymized_inputs"] == ["user_id", "zip_code"]
    assert logs["user_id"].map(is_pseudonym).all()
    assert pseudonym("1", key) in set(logs["user_id"]) and pseudonym("85711", key) in set(logs["zip_code"])
    assert all(is_pseudonym(z) for z in logs["zip_code"] if z)  # "" (a user not in u.user) stays unknown
    assert "technician" in set(logs["occupation"])  # not marked pii: as it is
    base = {"logs": {"files": ["x.csv"]}, "catalog": {"files": ["y.csv"]},
            "columns": {"labels": {"implicit": True}, "ad_text": ["title"], "user_numerics": ["income"]}}
    with pytest.raises(DataSpecError, match=r"columns\.pii: 'income' is not one of the user or context categoricals"):
        spec_from_dict({**base, "columns": {**base["columns"], "pii": ["income"]}})


def test_min_count_maps_rare_user_values_to_oov():
    logs = pd.DataFrame({"user_id": ["a"] * 5 + ["b"] * 2 + ["c"] * 3,
                         "region": ["common"] * 5 + ["rare"] * 2 + ["common"] * 3,  # rare: 2 rows, 1 user
                         "ad_id": ["x"] * 10})
    catalog = pd.DataFrame({"ad_id": ["x"]})
    from features.schema import FeatureSchema

    schema = FeatureSchema(user_categoricals=("region",), context_categoricals=(), context_integers=(),
                           ad_categoricals=())
    assert build_vocabularies(logs, catalog, schema)["user_id"] == ["a", "c", "b"]
    vocab = build_vocabularies(logs, catalog, schema, user_min_count=3)
    assert vocab["user_id"] == ["a", "c"]  # b has 2 rows
    assert vocab["region"] == []  # "common": 2 users; held by fewer than 3 people, however many rows
    vocab = build_vocabularies(logs, catalog, schema, user_min_count=2)
    assert vocab["user_id"] == ["a", "c", "b"] and vocab["region"] == ["common"]  # rare: 1 user


def test_job_vocabularies_follow_privacy_min_count(tmp_path):
    from trainer.prepare import prepare_data

    data = prepare_data(tiny_config(tmp_path, privacy={"min_count": 60}), with_negatives=False)
    train = data.split.train
    rows = train["user_id"].value_counts()
    assert set(data.vocabularies["user_id"]) == set(rows.index[rows >= 60]) and 0 < len(rows[rows < 60])
    holders = train.groupby("region")["user_id"].nunique()
    assert set(data.vocabularies["region"]) == set(holders.index[holders >= 60])
