"""Evaluation protocols: exact splits, histories built one way for training, evaluation and serving, and
every retrieval method given identical inputs."""

import numpy as np
import pandas as pd
import pytest

from features.history import HISTORY, build_histories, request_history
from features.protocol import EvaluationProtocol, apply_protocol, leaking_context
from features.schema import DEFAULT_SCHEMA as S
from features.split import column_split, leave_last_out_split, random_split, time_split


def _log(rows):
    return pd.DataFrame(rows, columns=["user_id", "ad_id", "timestamp", "click"])


def _world(n_users=12, n_events=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"a{rng.integers(0, 40)}", int(1000 + 10 * t + u), int(rng.random() < 0.7))
            for u in range(n_users) for t in range(n_events)]
    return _log(rows)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.37])
def test_time_and_random_splits_hold_out_exactly_the_fraction(fraction):
    logs = _world()
    logs.loc[::7, "timestamp"] = 1500  # many rows in one second: the time cut may not round up to whole seconds
    for split in (time_split(logs, fraction), random_split(logs, fraction, seed=3)):
        assert len(split.test) == round(len(logs) * fraction) and len(split.train) + len(split.test) == len(logs)
    split = time_split(logs, fraction)
    assert split.train.timestamp.max() <= split.cutoff <= split.test.timestamp.min()
    a, b = random_split(logs, fraction, seed=3), random_split(logs, fraction, seed=3)
    assert a.test.equals(b.test) and not a.test.equals(random_split(logs, fraction, seed=4).test)


def test_leave_last_out_holds_out_each_users_last_positives_and_what_follows():
    logs = _log([("a", "p", 1, 1), ("a", "q", 2, 0), ("a", "r", 3, 1), ("a", "s", 4, 1), ("a", "t", 5, 0),
                 ("b", "u", 1, 1), ("b", "v", 2, 1), ("c", "w", 1, 1)]).sample(frac=1.0, random_state=1)
    split = leave_last_out_split(logs, 1)
    assert sorted(split.test.ad_id) == ["s", "t", "v"]  # c has a single positive: nothing to query from
    assert sorted(leave_last_out_split(logs, 2).test.ad_id) == ["r", "s", "t"]  # b has only 2 positives


def test_column_split_and_its_errors():
    logs = _world().assign(side=lambda f: np.where(f.timestamp % 5 == 0, "test", "train"))
    split = column_split(logs, "side")
    assert (split.test.side == "test").all() and (split.train.side == "train").all()
    with pytest.raises(ValueError, match="not in the log"):
        column_split(logs, "fold")
    with pytest.raises(ValueError, match="both sides"):
        column_split(logs, "side", ("nope",))


def test_random_protocol_histories_are_the_users_other_training_positives():
    logs = _world()
    data = apply_protocol(logs, EvaluationProtocol(protocol="random", history_at_test="train_only",
                                                   exclude_seen=True), 500, S)
    train, test = data.split.train, data.split.test
    positives = train[train.click > 0]
    for _, row in train.sample(40, random_state=0).iterrows():
        own = positives[positives.user_id == row.user_id]
        expected = own.drop(index=row.name) if row.click > 0 else own
        assert sorted(a for a in row[HISTORY] if a) == sorted(expected.ad_id)  # every other one, any time
    for i, row in test.iterrows():
        own = positives[positives.user_id == row.user_id]
        assert sorted(a for a in row[HISTORY] if a) == sorted(own.ad_id)  # no held-out label ever an input
        assert sorted(data.excluded[i]) == sorted(own.ad_id)


def test_streaming_histories_hold_earlier_held_out_positives_but_never_later_ones():
    logs = _world()
    data = apply_protocol(logs, EvaluationProtocol(protocol="time", history_at_test="streaming"), 500, S)
    everything = logs[logs.click > 0]
    for _, row in data.split.test.iterrows():
        before = everything[(everything.user_id == row.user_id) & (everything.timestamp < row.timestamp)]
        assert sorted(a for a in row[HISTORY] if a) == sorted(before.ad_id)


def test_training_and_serving_build_a_history_the_same_way():
    """A training row's history (time-ordered protocols) is exactly what a request at that moment carries,
    and a held-out query's `train_only` history is what a request after training carries."""
    logs = _world()
    data = apply_protocol(logs, EvaluationProtocol(protocol="time", history_at_test="train_only"), 8, S)
    train = data.split.train
    for _, row in train.sample(30, random_state=2).iterrows():
        assert [a for a in row[HISTORY] if a] == request_history(train, row.user_id, 8, at=row.timestamp)
    for _, row in data.split.test.sample(10, random_state=2).iterrows():
        assert [a for a in row[HISTORY] if a] == request_history(train, row.user_id, 8)


def test_histories_are_capped_to_the_most_recent():
    logs = _log([("u", f"a{t}", t, 1) for t in range(10)])
    histories = build_histories(logs, logs, 3, "before")
    assert list(histories[-1]) == ["a8", "a7", "a6"]
    assert list(build_histories(logs.iloc[[0]], logs, 3, "all")[0]) == ["a9", "a8", "a7"]


def test_time_of_day_context_that_identifies_sessions_is_detected_under_a_random_split():
    from dataclasses import replace

    rows = [(f"u{u}", f"a{i}", 1_700_000_000 + 86_400 * s + 60 * i, 1)
            for u in range(20) for s in range(5) for i in range(8)]  # 5 sessions of 8 ratings per user
    logs = _log(rows)
    schema = replace(S, context_integers=("hour", "weekday"))
    protocol = EvaluationProtocol(protocol="random")
    split = random_split(logs, 0.2)
    dropped, overlap = leaking_context(split, protocol, schema)
    assert dropped == ("hour", "weekday") and overlap > 0.9
    assert leaking_context(split, protocol.model_copy(update={"session_context": "keep"}), schema)[0] == ()
    assert leaking_context(time_split(logs, 0.2), protocol.model_copy(update={"protocol": "time"}), schema)[0] == ()


def test_every_method_gets_the_same_rows_histories_and_exclusions(tmp_path):
    """The information-asymmetry check: the model scorer and a baseline see one `Queries`; the model's
    feature rows carry exactly the histories the baselines get as catalog rows; exclusions are shared."""
    from trainer.baselines.base import Scorer
    from trainer.comparison import compare, interactions_of, queries_of

    logs = _world()
    catalog = pd.DataFrame({"ad_id": [f"a{i}" for i in range(40)]})
    data = apply_protocol(logs, EvaluationProtocol(protocol="random", history_at_test="train_only",
                                                   exclude_seen=True), 6, S)
    train = interactions_of(data.split.train, catalog, S)
    queries = queries_of(data.split.test, data.excluded, catalog, train, S)
    seen = {}

    class Spy(Scorer):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def fit(self, train, validation=None):
            pass

        def score(self, q, start, stop):
            seen.setdefault(self.name, []).append(q)
            if self.name == "model":  # what a feature-reading model gets: ad ids per row
                names = np.array([list(h) for h in q.frame[HISTORY].iloc[start:stop]], dtype=object)
                rows = np.vectorize(lambda a: -1 if a == "" else int(a[1:]))(names)
                np.testing.assert_array_equal(rows, q.history[start:stop])
            return np.random.default_rng(0).random((stop - start, 40)).astype(np.float32)

    out = compare({"model": Spy("model"), "baseline": Spy("baseline")}, queries, train.item_counts(), {}, (10,))
    assert seen["model"][0] is seen["baseline"][0] is queries
    same_scores = {k: v for k, v in out["model"].items() if k != "score_seconds"}
    assert same_scores == {k: v for k, v in out["baseline"].items() if k != "score_seconds"}
    positives = data.split.train[data.split.train.click > 0]
    assert len(train) == len(positives) and set(np.asarray(train.item_ids)[train.items]) == set(positives.ad_id)
    held_out_positives = np.flatnonzero(data.split.test.click.to_numpy() > 0)
    assert len(queries) == len(held_out_positives)
    for i, row in enumerate(held_out_positives):
        assert set(queries.excluded(i)) == {int(a[1:]) for a in data.excluded[row]}
        assert len(data.excluded[row]) > 0 or queries.users[i] == -1


def test_per_user_metrics_normalise_by_the_users_held_out_count_as_published_random_split_results_do():
    from features.protocol import EvaluationProtocol, one_list_per_user
    from features.schema import FeatureSchema
    from trainer.metrics import per_user_metrics

    # user a: 3 held-out items ranked 0, 4 and 30; user b: 1 item ranked 1.
    out = per_user_metrics(np.array([0, 4, 30, 1]), np.array(["a", "a", "a", "b"]), (2, 5))
    assert out["user_recall@2"] == pytest.approx((1 / 2 + 1 / 1) / 2)  # a: 1 hit of min(2, 3); b: its one
    assert out["user_recall@5"] == pytest.approx((2 / 3 + 1) / 2)
    ideal_a = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    ndcg_a = (1 + 1 / np.log2(6)) / ideal_a
    assert out["user_ndcg@5"] == pytest.approx((ndcg_a + 1 / np.log2(3)) / 2)
    plain = FeatureSchema(context_integers=(), context_categoricals=())
    assert one_list_per_user(EvaluationProtocol(protocol="random", history_at_test="train_only"), plain)
    assert not one_list_per_user(EvaluationProtocol(protocol="time", history_at_test="streaming"), plain)
    assert not one_list_per_user(EvaluationProtocol(protocol="random", history_at_test="train_only"), FeatureSchema())
