"""The right to be forgotten (`adrec forget`, trainer/forget.py, docs/data.md#privacy).

End to end: the session's tiny job (version 1, `exported_tiny`) knows user u00001; `adrec forget`
lists them; the next version warm-starts from that job (vocabularies kept) on the same world and is
exported. Every byte of the new run's model directory (checkpoints included) and export lacks the
user's pseudonym while another user's is still there; the user's embedding rows equal the OOV row
in the new weights and checkpoint; the TF1-loaded graph and the embedded server answer them as an
unknown user, where version 1 did not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.pseudonym import DEFAULT_KEY_ENV, key_id, pseudonym
from tests.conftest import ROOT, fewer_impressions, tiny_config
from tests.test_privacy import _scan

ENV_KEY = os.environ[DEFAULT_KEY_ENV]  # conftest: the key of every test job and client
GONE, NOBODY = "u00001", "someone-never-logged"
USER = {"user_id": GONE, "age_bucket": "25-34", "gender": "f", "region": "r1"}
CONTEXT = {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}


def _forget_cli(cfg, *args: str) -> int:
    from trainer.cli import main

    return main(["forget", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model-dir", cfg.training.model_dir,
                 "--export-dir", cfg.export.export_dir, *args])


def _user_tables(model) -> list:
    from trainer.towers import CategoricalEmbedding

    return [layer for layer in model.submodules if isinstance(layer, CategoricalEmbedding)
            and layer.name == "emb_user_id"]


@pytest.fixture(scope="module")
def next_version(trained_tiny, exported_tiny, tmp_path_factory):
    """Version 2 of the tiny job after `adrec forget --user u00001`: warm start, fewer new logs, one epoch."""
    from trainer.export import export_all
    from trainer.job import run_training

    cfg = tiny_config(tmp_path_factory.mktemp("forget"), data=fewer_impressions(6000),
                      retrieval={"epochs": 1}, ranking={"epochs": 1})
    assert _forget_cli(cfg, "--user", GONE) == 0
    trained = run_training(cfg, progress=False, warm_start=trained_tiny.config.training.model_dir)
    return trained, export_all(trained, cfg.export.export_dir)


def test_forget_removes_the_user_from_the_next_version(trained_tiny, exported_tiny, next_version):
    from trainer.forget import TOMBSTONE

    trained, export = next_version
    key = ENV_KEY.encode()
    gone = pseudonym(GONE, key)
    old_vocab = trained_tiny.vocabularies["user_id"]
    kept = next(u for u in old_vocab if u != gone)  # the most active other user
    position = old_vocab.index(gone)
    new_vocab = trained.vocabularies["user_id"]
    assert new_vocab[position] == f"{TOMBSTONE}{position}" and len(new_vocab) == len(old_vocab)
    assert gone not in new_vocab and kept in new_vocab

    cfg = trained.config
    dirs = [Path(cfg.training.model_dir), Path(cfg.export.export_dir)]
    found = _scan(dirs, [gone.encode(), kept.encode(), GONE.encode()])
    assert gone not in found and GONE not in found
    where = {Path(f).relative_to(Path(cfg.training.model_dir).parent).parts[1] for f in found[kept]}
    assert {"vocabularies.json", "retrieval", "ranking", "recommender"} <= where  # the scan can find a pseudonym
    assert list((Path(cfg.training.model_dir) / "checkpoints").glob("*.data-*"))  # scanned with the rest

    # The weights: in version 1 the user's rows were their own; now every one equals its table's OOV row.
    for old_model, new_model in ((trained_tiny.retrieval, trained.retrieval), (trained_tiny.ranking, trained.ranking)):
        old_tables, new_tables = _user_tables(old_model), _user_tables(new_model)
        assert old_tables and len(old_tables) == len(new_tables)
        for old, new in zip(old_tables, new_tables, strict=True):
            before, after = old.embedding.embeddings.numpy(), new.embedding.embeddings.numpy()
            assert not np.allclose(before[position + 1], before[0])
            np.testing.assert_array_equal(after[position + 1], after[0])
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(Path(cfg.training.model_dir) / "checkpoints")))
    tables = [name for name, shape in reader.get_variable_to_shape_map().items()
              if "user_id" in name and name.endswith("VARIABLE_VALUE") and shape and shape[0] == len(new_vocab) + 1]
    assert tables, reader.get_variable_to_shape_map()
    for name in tables:
        rows = reader.get_tensor(name)
        np.testing.assert_array_equal(rows[position + 1], rows[0])


def _query(trained, user: str) -> dict[str, np.ndarray]:
    from trainer.inputs import query_inputs
    from trainer.serving_artifacts import as_numpy_features

    schema = trained.schema
    rows = trained.split.test.iloc[:1].assign(user_id=user)
    return as_numpy_features(rows, query_inputs(schema, trained.config.retrieval.history_length), schema)


def test_the_forgotten_user_is_served_as_unknown(trained_tiny, exported_tiny, next_version):
    from serving.client import RecommendationClient
    from serving.servable import Servable
    from serving.server import EmbeddedModelServer, discover_models
    from trainer.forget import TOMBSTONE

    trained, export = next_version
    key = ENV_KEY.encode()
    gone, nobody = pseudonym(GONE, key), pseudonym(NOBODY, key)
    position = trained_tiny.vocabularies["user_id"].index(gone)

    def scores(path, user):  # loaded the TF1 way, as TF Serving loads it
        return Servable("retrieval", 0, path).run(_query(trained, user))["scores"]

    old = exported_tiny.paths["retrieval"]
    assert not np.allclose(scores(old, gone), scores(old, nobody))  # version 1 knew them
    new = export.paths["retrieval"]
    np.testing.assert_array_equal(scores(new, gone), scores(new, nobody))
    np.testing.assert_array_equal(scores(new, f"{TOMBSTONE}{position}"), scores(new, nobody))

    base = export.paths["recommender"].parent.parent
    with EmbeddedModelServer(discover_models(base), host="127.0.0.1", port=0) as server, \
            RecommendationClient(server.address, pseudonym_key=key, key_env=None) as client:
        asked = client.recommend(USER, CONTEXT, k=5)
        unknown = client.recommend({**USER, "user_id": NOBODY}, CONTEXT, k=5)
    assert [(a.ad_id, a.scores) for a in asked] == [(a.ad_id, a.scores) for a in unknown]


def test_forget_lists_keyed_pseudonyms_never_raw_ids(tmp_path, capsys):
    from trainer.forget import read_forget_list

    cfg = tiny_config(tmp_path)
    users = tmp_path / "users.txt"
    users.write_text("u00002\n\nu00003\nu00002\n")
    assert _forget_cli(cfg, "--user", "u00001", "--users-file", str(users)) == 0
    out, err = capsys.readouterr()
    listed = tmp_path / "forgotten_users.jsonl"  # beside the model directory
    assert json.loads(out) == {"added": 3, "already_listed": 0, "forget_file": str(listed)}
    assert "3 user(s) added" in err and "0 already there" in err
    text = listed.read_text()
    assert "u0000" not in text and listed.stat().st_mode & 0o077 == 0
    key = ENV_KEY.encode()
    entries = read_forget_list(listed)
    assert [e["user"] for e in entries] == [pseudonym(u, key) for u in ("u00001", "u00002", "u00003")]
    assert {e["key_id"] for e in entries} == {key_id(key)} and all(e["forgotten_at"].endswith("Z") for e in entries)

    assert _forget_cli(cfg, "--user", "u00003", "--user", pseudonym("u00004", key)) == 0  # a pseudonym is taken too
    assert json.loads(capsys.readouterr().out)["added"] == 1
    assert len(read_forget_list(listed)) == 4
    assert [p.name for p in tmp_path.glob(".forgotten_users.jsonl.*")] == [".forgotten_users.jsonl.lock"]  # no temp


def test_forget_refuses_what_it_cannot_do(tmp_path, capsys, monkeypatch):
    import trainer.forget as forget

    cfg = tiny_config(tmp_path)
    refusals = [((), "no user to forget"), (("--user", "x" * 1001), "over 1,000"),
                (("--set", "privacy.pseudonymize=false", "--user", "a"), "privacy.pseudonymize is off"),
                (("--set", f"privacy.forget_file={tmp_path / 'run' / 'f.jsonl'}", "--user", "a"),
                 "inside training.model_dir"),
                (("--users-file", str(tmp_path / "missing.txt")), "does not exist")]
    for args, message in refusals:
        assert _forget_cli(cfg, *args) == 1
        assert message in capsys.readouterr().err, args
    monkeypatch.setattr(forget, "MAX_IDS", 2)
    assert _forget_cli(cfg, "--user", "a", "--user", "b", "--user", "c") == 1
    assert "at most 2" in capsys.readouterr().err
    monkeypatch.setattr(forget, "MAX_USERS_FILE_BYTES", 10)
    (tmp_path / "big.txt").write_text("u1\nu2\nu3\nu4\n")
    assert _forget_cli(cfg, "--users-file", str(tmp_path / "big.txt")) == 1
    assert "split it" in capsys.readouterr().err
    assert not (tmp_path / "forgotten_users.jsonl").exists()  # nothing half-recorded


def test_training_drops_forgotten_rows_at_ingest(tmp_path, capsys):
    from trainer.continuous import _day_config
    from trainer.forget import ForgetError, forget_file, forget_users
    from trainer.prepare import load_job_data

    cfg = tiny_config(tmp_path, data=fewer_impressions(3000))
    _, before, _ = load_job_data(cfg)
    key = ENV_KEY.encode()
    gone = pseudonym(GONE, key)
    assert (before["user_id"] == gone).sum() > 0
    assert forget_users(cfg, [GONE, NOBODY]) == (2, 0, tmp_path / "forgotten_users.jsonl")
    capsys.readouterr()
    _, after, _ = load_job_data(cfg)
    dropped = int((before["user_id"] == gone).sum())
    assert gone not in set(after["user_id"]) and len(after) == len(before) - dropped
    assert f"2 forgotten user(s) on the forget list; dropped {dropped:,d} log rows of the 1 in these logs" \
        in capsys.readouterr().err
    frames = (load_job_data(cfg)[0], before)  # the continuous loop's path: frames it read itself
    assert gone not in set(load_job_data(cfg, frames=frames)[1]["user_id"])
    # The loop's day runs read the loop's list, not one beside each day's model directory.
    assert _day_config(cfg, tmp_path / "state", "2026-12-01").privacy.forget_file == str(forget_file(cfg))

    with pytest.raises(ForgetError, match="privacy.pseudonymize is off"):
        load_job_data(tiny_config(tmp_path, privacy={"pseudonymize": False}))
    listed = tmp_path / "forgotten_users.jsonl"
    listed.write_text(listed.read_text().replace(key_id(key), "0123456789abcdef"))
    with pytest.raises(ForgetError, match="another pseudonymisation key"):
        load_job_data(cfg)
    listed.write_text("{not json\n")
    with pytest.raises(ForgetError, match="line 1: not JSON"):
        load_job_data(cfg)


def test_the_loops_day_runs_hash_with_the_key_forget_uses(tmp_path, monkeypatch):
    from trainer.continuous import _day_config
    from trainer.privacy import job_key

    monkeypatch.delenv(DEFAULT_KEY_ENV, raising=False)  # no key configured: the default file beside model_dir
    cfg = tiny_config(tmp_path)
    day = _day_config(cfg, tmp_path / "state", "2026-12-01")
    assert Path(day.training.model_dir).parent == tmp_path / "state" / "runs"
    assert day.privacy.key_file == str(tmp_path / "pseudonym.key")  # not one beside the day's run
    assert job_key(day) == job_key(tiny_config(tmp_path))  # what `adrec forget --config` hashes with
    assert not (tmp_path / "state" / "runs" / "pseudonym.key").exists()


def test_tombstones_keep_positions():
    from features.vocab import Vocabularies
    from trainer.forget import is_tombstone, tombstone_vocabularies

    vocab = Vocabularies({"user_id": ["p_a", "p_b", "p_c"], "hour": [1, 2], "region": ["r1"]})
    out, n = tombstone_vocabularies(vocab, frozenset({"p_b", "p_zz"}))
    assert n == 1 and out["user_id"] == ["p_a", "forgotten:1", "p_c"] and out["hour"] == [1, 2]
    assert vocab["user_id"] == ["p_a", "p_b", "p_c"]  # the loaded vocabularies are left as they were
    again, m = tombstone_vocabularies(out, frozenset({"p_b", "p_c"}))
    assert m == 1 and again["user_id"] == ["p_a", "forgotten:1", "forgotten:2"]
    assert is_tombstone("forgotten:1") and not is_tombstone("p_a") and not is_tombstone(3)
    assert pd.Series(again["user_id"]).is_unique
