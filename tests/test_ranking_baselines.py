"""What the ranking comparison stands on: the user counters (earlier events only), gAUC, the paired
bootstrap, and the baselines fitted on the model's training rows."""

import numpy as np
import pandas as pd
import pytest

from features.schema import FeatureSchema
from features.user_stats import RECENT_CLICKS, USER_CLICKS, USER_EVENTS, add_user_stats
from trainer.metrics import auc, group_auc, paired_bootstrap

S = FeatureSchema(user_categoricals=(), context_categoricals=(), context_integers=("hour",), ad_categoricals=(),
                  ad_text=("title",), bid="", position="", conversion="")


def test_user_counters_see_only_strictly_earlier_events():
    logs = pd.DataFrame({"user_id": ["a", "a", "a", "b", "a", "a", "a"], "ad_id": list("xyzxwvu"),
                         "timestamp": [1, 2, 2, 1, 3, 4, 5],
                         "click": [1, 0, 1, 1, 0, 1, 1]})
    out = add_user_stats(logs.sample(frac=1.0, random_state=0), window=2, schema=S).sort_index()
    assert out[USER_EVENTS].tolist() == [0, 1, 1, 0, 3, 4, 5]  # the two rows at t=2 do not see each other
    assert out[USER_CLICKS].tolist() == [0, 1, 1, 0, 2, 2, 3]
    # the last two earlier events (ties in one second by ad id: y before z): t=3 sees (y, z) -> 1 click;
    # t=4 sees (z click, w) -> 1; t=5 sees (w, v click) -> 1; the shuffled row order changes nothing
    assert out[RECENT_CLICKS].tolist() == [0, 1, 1, 0, 1, 1, 1]
    assert out.index.tolist() == list(range(7)) and (out[USER_EVENTS].dtype == np.int64)


def test_group_auc_weights_users_by_their_rows_and_skips_one_label_users():
    users = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 3)
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.1, 0.9, 0.5, 0.4, 0.3])
    a = auc(labels[:4], scores[:4])  # 0.75
    g = group_auc(labels, scores, users)
    assert g == {"gauc": pytest.approx((4 * a + 2 * 0.0) / 6), "groups": 2, "rows": 6}


def test_paired_bootstrap_is_zero_for_equal_models_and_positive_for_a_better_one():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(60), 40)
    truth = rng.normal(size=len(users))
    labels = (rng.random(len(users)) < 1 / (1 + np.exp(-2 * truth))).astype(int)
    good, noisy = truth, truth + rng.normal(scale=2.0, size=len(users))
    prob = 1 / (1 + np.exp(-2 * good))
    same = paired_bootstrap(labels, good, good, prob, prob, users, n_resamples=200, seed=1)
    for key in ("gauc", "auc", "logloss"):
        assert same[key] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    better = paired_bootstrap(labels, good, noisy, prob, 1 / (1 + np.exp(-noisy)), users, n_resamples=200, seed=1)
    assert 0 < better["gauc"]["low"] < better["gauc"]["difference"] < better["gauc"]["high"]
    assert 0 < better["auc"]["low"] and better["logloss"]["high"] < 0
    again = paired_bootstrap(labels, good, noisy, prob, 1 / (1 + np.exp(-noisy)), users, n_resamples=200, seed=1)
    assert again == better  # one seed, the same resamples


def _world(n_users=120, n_ads=40, per_user=60, seed=0):
    """Users with a generosity, ads with a quality; clicks follow both."""
    rng = np.random.default_rng(seed)
    generosity, quality = rng.normal(size=n_users), rng.normal(size=n_ads)
    user = np.repeat(np.arange(n_users), per_user)
    ad = rng.integers(0, n_ads, len(user))
    p = 1 / (1 + np.exp(-(generosity[user] + quality[ad])))
    logs = pd.DataFrame({"user_id": [f"u{u}" for u in user], "ad_id": [f"a{a}" for a in ad],
                         "hour": rng.integers(0, 24, len(user)), "timestamp": rng.permutation(len(user)),
                         "click": (rng.random(len(user)) < p).astype(np.float32)})
    catalog = pd.DataFrame({"ad_id": [f"a{a}" for a in range(n_ads)],
                            "title": [f"film {'good' if q > 0 else 'bad'} {a}" for a, q in enumerate(quality)]})
    return add_user_stats(logs.sort_values("timestamp").reset_index(drop=True), 10, S), catalog


def test_baselines_fit_on_training_rows_and_score_test_rows():
    from trainer.ranking_baselines import RankingBaselines

    logs, catalog = _world()
    train, test = logs.iloc[:5000], logs.iloc[5000:]
    baselines = RankingBaselines(S, catalog, window=10, seed=0).fit(train)
    predicted = baselines.predict(test)
    assert set(predicted) == {"item rate", "user rate", "user recent rate", "item + user recent",
                              "logistic regression", "gradient-boosted trees"}
    y = test["click"].to_numpy()
    for name, p in predicted.items():
        assert p.shape == (len(test),) and ((p > 0) & (p < 1)).all(), name
    assert auc(y, predicted["item rate"]) > 0.6  # the ads' quality
    assert auc(y, predicted["user rate"]) > 0.6  # the users' generosity, from their earlier events only
    for name in ("item + user recent", "logistic regression", "gradient-boosted trees"):  # both
        assert auc(y, predicted[name]) > max(auc(y, predicted["item rate"]), auc(y, predicted["user rate"])), name
    assert baselines.params["item_strength"] > 0 and baselines.params["C"] > 0


def test_bootstrap_gauc_difference_by_hand():
    from trainer.metrics import bootstrap_gauc_difference

    # Users x and y have two rows each (one click); z has no click, so no AUC, and drops out.
    users = np.array(["x", "x", "y", "y", "z"])
    labels = np.array([1, 0, 1, 0, 0])
    right = np.array([0.9, 0.1, 0.9, 0.1, 0.5])  # AUC 1 for x and for y: gAUC 1
    x_wrong = np.array([0.1, 0.9, 0.9, 0.1, 0.5])  # x 0, y 1: gAUC (2 * 0 + 2 * 1) / 4 = 0.5
    one = bootstrap_gauc_difference(labels, [right], [x_wrong], users, n_resamples=2000, seed=0)
    assert one["difference"] == pytest.approx(0.5) and one["groups"] == 2
    # A resample of x twice differs by 1, of y twice by 0 (1/4 of resamples each): the 95 % interval is [0, 1].
    assert (one["low"], one["high"]) == (0.0, 1.0)
    # Arm a's gAUC is the mean over its runs: (1 + 0.5) / 2 = 0.75, so 0.25 above b's 0.5.
    two = bootstrap_gauc_difference(labels, [right, x_wrong], [x_wrong], users, n_resamples=2000, seed=0)
    assert two["difference"] == pytest.approx(0.25) and (two["low"], two["high"]) == (0.0, 0.5)
    assert bootstrap_gauc_difference(labels, [right], [right], users, n_resamples=50)["high"] == 0.0
