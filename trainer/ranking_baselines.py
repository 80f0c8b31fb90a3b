"""Ranking baselines, fitted on exactly the rows the ranking model trains on and scored on the same test rows.

- `item rate`: the ad's smoothed click rate in the training rows (unknown ads: the training rate);
- `user rate`: the user's smoothed click rate over all earlier events, and `user recent rate` over
  the last `window` (the counters of `features/user_stats.py`: known for users unseen in training);
- `item + user recent`: the sum of the item's and the recent user rate's logits, less the prior's;
- `logistic regression`: one-hot user id, ad id, every query and ad categorical, the ad text's words
  (binary), and the user counters as the ranking model reads them;
- `gradient-boosted trees` (scikit-learn's HistGradientBoosting): the same features, with ids and
  categoricals as their out-of-fold smoothed training click rates and counts, and the text's most
  frequent words.

The smoothing strengths and the logistic regression's C are chosen on the latest
`validation_fraction` of the training rows (fitted on the earlier ones), then every baseline is
refitted on all training rows. None of them reads the `history` sequence the model can pool.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.schema import FeatureSchema
from features.split import time_split
from features.user_stats import RECENT_CLICKS, USER_CLICKS, USER_EVENTS, smoothed_rates
from trainer.metrics import group_auc, log_loss

STRENGTHS = (1.0, 3.0, 10.0, 30.0)  # pseudo-rows of smoothing tried for click rates
C_GRID = (0.03, 0.1, 0.3, 1.0)
GBT_WORDS = 64  # most frequent text words the trees see
MIN_WORD_ADS = 3  # the logistic regression's words: in at least this many training ads
WORD = re.compile(r"[a-z0-9]+")


def logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def smoothed_rate(train: pd.DataFrame, key: str, click: str, values: pd.Series, prior: float,
                  strength: float) -> tuple[np.ndarray, np.ndarray]:
    """(rate, count) of each of `values` in `train`'s `key` column: (clicks + strength * prior) / (rows + strength)."""
    stats = train.groupby(key, observed=True)[click].agg(["sum", "count"])
    hits = values.map(stats["sum"]).fillna(0.0).to_numpy(np.float64)
    rows = values.map(stats["count"]).fillna(0.0).to_numpy(np.float64)
    return (hits + strength * prior) / (rows + strength), rows


def out_of_fold_rate(train: pd.DataFrame, key: str, click: str, prior: float, strength: float, folds: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`smoothed_rate` of each training row's value computed without the row's own fold (no target leak)."""
    fold = np.random.default_rng(seed).integers(0, folds, len(train))
    rate, count = np.zeros(len(train)), np.zeros(len(train))
    for f in range(folds):
        inside = fold == f
        rate[inside], count[inside] = smoothed_rate(train[~inside], key, click, train[key][inside], prior, strength)
    return rate, count * folds / (folds - 1)  # counts on the scale of the full training rows


def user_counter_features(rows: pd.DataFrame, window: int, prior: float) -> np.ndarray:
    """The user counters as `trainer.towers.UserStatsFeatures` gives them to the model."""
    events = rows[USER_EVENTS].to_numpy(np.float64)
    overall, recent = smoothed_rates(events, rows[USER_CLICKS], rows[RECENT_CLICKS], window, prior)
    return np.column_stack([np.log1p(events) / 5.0, logit(overall), logit(recent),
                            np.log1p(np.minimum(events, window)) / 5.0])


class RankingBaselines:
    """Fits every baseline on the training rows; `predict(rows)` gives each one's click probabilities."""

    def __init__(self, schema: FeatureSchema, catalog: pd.DataFrame, window: int, validation_fraction: float = 0.1,
                 seed: int = 0):
        self.schema, self.catalog, self.window = schema, catalog, window
        self.validation_fraction, self.seed = validation_fraction, seed
        self.params: dict = {}

    # ------------------------------------------------------------------ shared feature pieces
    def _categoricals(self) -> tuple[str, ...]:
        s = self.schema
        return (*s.query_features, *s.ad_string_features)

    def _ad_words(self, train: pd.DataFrame) -> tuple[list[str], dict[str, set]]:
        """Words of each training ad's text; the vocabulary: words in >= MIN_WORD_ADS training ads."""
        s = self.schema
        seen = self.catalog[self.catalog[s.ad_id].isin(set(train[s.ad_id]))]
        words = {a: set(WORD.findall(t.lower())) for a, t in zip(seen[s.ad_id], s.ad_text_of(seen), strict=True)}
        ads_per_word = pd.Series([w for ws in words.values() for w in ws]).value_counts()
        vocab = sorted(ads_per_word[ads_per_word >= MIN_WORD_ADS].index)
        all_words = {str(a): set(WORD.findall(t.lower()))
                     for a, t in zip(self.catalog[s.ad_id], s.ad_text_of(self.catalog), strict=True)}
        return vocab, all_words

    def _word_matrix(self, rows: pd.DataFrame, vocab: list[str]) -> sp.csr_matrix:
        index = {w: i for i, w in enumerate(vocab)}
        ad_rows = {}
        for a, ws in self.words.items():
            ad_rows[a] = sorted(index[w] for w in ws if w in index)
        ads = rows[self.schema.ad_id].astype(str).to_numpy()
        cols = [ad_rows.get(a, []) for a in ads]
        indptr = np.r_[0, np.cumsum([len(c) for c in cols])]
        data = np.ones(indptr[-1])
        return sp.csr_matrix((data, np.concatenate(cols or [[]]).astype(np.int64), indptr),
                             shape=(len(rows), len(vocab)))

    # ------------------------------------------------------------------ fitting
    def fit(self, train: pd.DataFrame) -> RankingBaselines:
        s = self.schema
        inner = time_split(train, self.validation_fraction, s)
        self._choose(inner.train, inner.test)
        self._fit_all(train)
        return self

    def _choose(self, earlier: pd.DataFrame, validation: pd.DataFrame) -> None:
        """Smoothing strengths and C by the validation rows' gAUC (ties: log loss)."""
        s = self.schema
        y, users = validation[s.click].to_numpy(), validation[s.user_id].to_numpy()
        prior = float(earlier[s.click].mean())

        def score(p):
            return (round(group_auc(y, p, users)["gauc"], 4), -log_loss(y, p))

        item = {m: smoothed_rate(earlier, s.ad_id, s.click, validation[s.ad_id], prior, m)[0] for m in STRENGTHS}
        self.params["item_strength"] = max(STRENGTHS, key=lambda m: score(item[m]))
        self._fit_all(earlier, choose_c=True, validation=validation)

    def _fit_all(self, train: pd.DataFrame, choose_c: bool = False, validation: pd.DataFrame | None = None) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression

        s = self.schema
        self.train = train
        self.prior = float(train[s.click].mean())
        y = train[s.click].to_numpy() > 0
        vocab, self.words = self._ad_words(train)
        self.lr_vocab = vocab
        word_rows = self._word_matrix(train, vocab)
        freq = np.asarray(word_rows.sum(axis=0)).ravel()
        self.gbt_vocab = [vocab[i] for i in np.argsort(-freq)[:GBT_WORDS]]
        # logistic regression: one-hot categoricals, words, counters
        self.levels = {n: {v: i for i, v in enumerate(pd.unique(train[n].astype(str)))} for n in self._categoricals()}
        x = self._lr_matrix(train)
        if choose_c:
            xv, yv = self._lr_matrix(validation), validation[s.click].to_numpy()
            users = validation[s.user_id].to_numpy()
            best = None
            for c in C_GRID:
                p = LogisticRegression(C=c, max_iter=1000).fit(x, y).predict_proba(xv)[:, 1]
                key = (round(group_auc(yv, p, users)["gauc"], 4), -log_loss(yv, p))
                if best is None or key > best[0]:
                    best = (key, c)
            self.params["C"] = best[1]
            return
        self.lr = LogisticRegression(C=self.params["C"], max_iter=1000).fit(x, y)
        # trees: out-of-fold target encodings on the training rows, full-training ones for other rows
        self.gbt = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                                                  l2_regularization=1.0, early_stopping=True,
                                                  validation_fraction=0.1, n_iter_no_change=20,
                                                  random_state=self.seed)
        self.gbt.fit(self._gbt_matrix(train, out_of_fold=True), y)

    # ------------------------------------------------------------------ design matrices
    def _lr_matrix(self, rows: pd.DataFrame) -> sp.csr_matrix:
        blocks = []
        for n, levels in self.levels.items():
            col = rows[n].astype(str).map(levels).fillna(-1).astype(int).to_numpy()
            known = col >= 0
            blocks.append(sp.csr_matrix((np.ones(known.sum()), (np.flatnonzero(known), col[known])),
                                        shape=(len(rows), len(levels))))
        blocks.append(self._word_matrix(rows, self.lr_vocab))
        blocks.append(sp.csr_matrix(user_counter_features(rows, self.window, self.prior)))
        return sp.hstack(blocks).tocsr()

    def _gbt_matrix(self, rows: pd.DataFrame, out_of_fold: bool = False) -> np.ndarray:
        s, m = self.schema, self.params["item_strength"]
        columns = []
        for n in self._categoricals():
            if s.is_int_feature(n):  # hour, weekday: small ordered integers, as they are
                columns.append(rows[n].to_numpy(np.float64))
                continue
            if out_of_fold:
                rate, count = out_of_fold_rate(rows, n, s.click, self.prior, m, 5, self.seed)
            else:
                rate, count = smoothed_rate(self.train, n, s.click, rows[n], self.prior, m)
            columns += [logit(rate), np.log1p(count)]
        words = self._word_matrix(rows, self.gbt_vocab).toarray()
        return np.column_stack([*columns, words, user_counter_features(rows, self.window, self.prior)])

    # ------------------------------------------------------------------ scoring
    def predict(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """Click probabilities of every baseline for `rows`."""
        s = self.schema
        item, _ = smoothed_rate(self.train, s.ad_id, s.click, rows[s.ad_id], self.prior, self.params["item_strength"])
        overall, recent = smoothed_rates(rows[USER_EVENTS], rows[USER_CLICKS], rows[RECENT_CLICKS], self.window,
                                         self.prior)
        return {"item rate": item, "user rate": overall, "user recent rate": recent,
                "item + user recent": _sigmoid(logit(item) + logit(recent) - logit(self.prior)),
                "logistic regression": self.lr.predict_proba(self._lr_matrix(rows))[:, 1],
                "gradient-boosted trees": self.gbt.predict_proba(self._gbt_matrix(rows))[:, 1]}
