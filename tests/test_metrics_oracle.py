"""The pure metric and calibration functions against scikit-learn as the oracle (closed-form, no model)."""

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from trainer.calibration import apply_parametric, fit_parametric, pool_adjacent_violators, sigmoid
from trainer.metrics import auc, group_auc, log_loss


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_log_loss_equal_scikit_learns_ties_included(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties, averaged ranks
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    probs = sigmoid(scores)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), abs=1e-9)


def test_group_auc_is_the_row_weighted_mean_of_each_users_scikit_learn_auc():
    rng = np.random.default_rng(7)
    users = rng.integers(0, 12, 600)
    labels = rng.integers(0, 2, 600)
    labels[users == 11] = 1  # one label only: left out of gAUC
    scores = rng.normal(labels * 0.5 + users * 0.1, 1.0)
    parts = [(roc_auc_score(labels[users == u], scores[users == u]), (users == u).sum()) for u in range(11)]
    expected = sum(a * n for a, n in parts) / sum(n for _, n in parts)
    out = group_auc(labels, scores, users)
    assert out["gauc"] == pytest.approx(expected, abs=1e-12)
    assert out["groups"] == 11 and out["rows"] == int((users != 11).sum())


def test_pool_adjacent_violators_equals_scikit_learns_isotonic_fit():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300).astype(float)
    w = rng.uniform(0.5, 2.0, 300)
    x = np.arange(300.0)
    expected = IsotonicRegression().fit(x, y, sample_weight=w).predict(x)
    np.testing.assert_allclose(pool_adjacent_violators(y, w), expected, atol=1e-12)


def test_platt_calibration_fits_what_an_unpenalised_logistic_regression_on_the_logit_fits():
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 2.0, 4000)
    labels = (rng.uniform(size=4000) < sigmoid(0.6 * logits - 0.4)).astype(int)
    ours = apply_parametric(fit_parametric(logits, labels, "platt"), logits)
    oracle = LogisticRegression(C=1e6, max_iter=1000).fit(logits[:, None], labels).predict_proba(logits[:, None])[:, 1]
    np.testing.assert_allclose(ours, oracle, atol=2e-3)  # the fit's tiny L2 pull towards the identity
