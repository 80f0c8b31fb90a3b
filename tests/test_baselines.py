"""Retrieval baselines against hand-computed cases, the ranking rule they share, and hyperparameter selection."""

import json
import math

import numpy as np
import pytest

from features.interactions import Interactions, Queries, exclusion_lists
from trainer.baselines import (
    EASE,
    EASETooLarge,
    IdOnlyScorer,
    ItemKNN,
    MostPopular,
    SASRec,
    Scorer,
    rank_queries,
    select_and_fit,
)
from trainer.baselines.base import history_multi_hot
from trainer.metrics import retrieval_metrics


def interactions(pairs, n_users, n_items, user_ids=None, item_ids=None) -> Interactions:
    """(user, item) pairs in time order."""
    users, items = (np.array([p[i] for p in pairs]) for i in (0, 1))
    return Interactions(users, items, np.arange(len(pairs)), n_users, n_items,
                        user_ids or [f"u{u}" for u in range(n_users)], item_ids or [f"ad{i}" for i in range(n_items)])


def queries(histories, targets=None, users=None, excluded=None, width=None) -> Queries:
    """Histories most recent first; no exclusions unless given."""
    n = len(histories)
    width = width or max([len(h) for h in histories] + [1])
    hist = np.full((n, width), -1)
    for i, h in enumerate(histories):
        hist[i, :len(h)] = h
    indptr, items = exclusion_lists([np.asarray(e) for e in (excluded or [[]] * n)])
    return Queries(hist, np.zeros(n) if users is None else users, np.zeros(n) if targets is None else targets,
                   indptr, items)


# Four users, four items:  u0 {0, 1}, u1 {0, 1, 2}, u2 {1, 2}, u3 {2, 3}.
# Item counts (squared norms) 2, 3, 3, 1; co-occurrences (0,1)=2, (0,2)=1, (1,2)=2, (2,3)=1, (0,3)=(1,3)=0.
TOY = interactions([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (3, 3)], 4, 4)


def test_most_popular_scores_are_training_counts():
    scorer = MostPopular()
    scorer.fit(TOY)
    np.testing.assert_array_equal(scorer.score(queries([[0], [3]]), 0, 2), [[2, 3, 3, 1]] * 2)


def test_itemknn_cosine_with_and_without_shrinkage():
    # shrink 0: s01 = 2/sqrt(2*3) = 0.816497, s02 = 1/sqrt(6) = 0.408248, s12 = 2/3, s23 = 1/sqrt(3) = 0.577350.
    # History [0, 3, 0] is the set {0, 3}: item 1 gets s01 + s13 = 0.816497, item 2 gets s02 + s23 = 0.985599,
    # items 0 and 3 get only s03 = 0 (no self-similarity).
    plain = ItemKNN(shrink=0.0)
    plain.fit(TOY)
    np.testing.assert_allclose(plain.score(queries([[0, 3, 0], [1]]), 0, 2),
                               [[0, 0.816497, 0.985599, 0], [0.816497, 0, 0.666667, 0]], atol=1e-6)
    # shrink 10: s01 = 2/(sqrt 6 + 10) = 0.160649, s02 = 0.080325, s23 = 1/(sqrt 3 + 10) = 0.085237, s12 = 2/13;
    # history {0, 3}: item 2 gets s02 + s23 = 0.165561.
    shrunk = ItemKNN(shrink=10.0)
    shrunk.fit(TOY)
    np.testing.assert_allclose(shrunk.score(queries([[0, 3], [1]]), 0, 2),
                               [[0, 0.160649, 0.165561, 0], [0.160649, 0, 0.153846, 0]], atol=1e-6)


def test_itemknn_neighbor_cut_keeps_each_items_most_similar():
    # One neighbour per candidate item j: 0 -> 1 (0.816 > 0.408), 1 -> 0 (0.816 > 0.667),
    # 2 -> 1 (0.667 > 0.577 > 0.408), 3 -> 2 (its only one).
    # History {0, 3}: only item 1 has a neighbour in it (0): [0, 0.816497, 0, 0].
    # History {1, 2}: 0 <- 1 (0.816497), 2 <- 1 (0.666667), 3 <- 2 (0.577350), 1's neighbour 0 is absent.
    cut = ItemKNN(shrink=0.0, neighbors=1, block_elements=4)  # one row per block
    cut.fit(TOY)
    np.testing.assert_allclose(cut.score(queries([[0, 3], [2, 1]]), 0, 2),
                               [[0, 0.816497, 0, 0], [0.816497, 0, 0.666667, 0.577350]], atol=1e-6)
    # Enough neighbours for all == no cut, with similarity rows computed a few at a time when scoring.
    rng = np.random.default_rng(1)
    train = interactions(list(zip(*np.nonzero(rng.random((40, 60)) < 0.1), strict=True)), 40, 60)
    q = queries([rng.choice(60, k, replace=False) for k in (0, 1, 5, 12)])
    full, small_blocks = ItemKNN(5.0, 60), ItemKNN(5.0, None, block_elements=130)
    full.fit(train)
    small_blocks.fit(train)
    np.testing.assert_allclose(full.score(q, 0, 4), small_blocks.score(q, 0, 4), atol=1e-6)


def test_ease_two_items_by_hand():
    # Users {0, 1}, {0}, {0, 1}, {1}: G = XᵀX = [[3, 2], [2, 3]]. With diag(B) = 0 each column is a one-feature
    # ridge regression: B_01 = G_01 / (G_00 + λ) = 2 / (3 + 1) = 0.5, and B_10 = 0.5 likewise.
    train = interactions([(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 1)], 4, 2)
    for path in ("dense", "woodbury"):
        scorer = EASE(l2=1.0, path=path)
        scorer.fit(train)
        np.testing.assert_allclose(scorer.score(queries([[0], [1], [0, 1], []]), 0, 4),
                                   [[0, 0.5], [0.5, 0], [0.5, 0.5], [0, 0]], atol=1e-6)


def test_ease_matches_the_closed_form_and_per_item_ridge_regressions():
    x = TOY.matrix().toarray().astype(np.float64)
    lam = 2.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    b = np.eye(4) - p / np.diag(p)[None, :]
    for j in range(4):  # column j of B: ridge regression of item j on the other items, B_jj = 0
        others = [i for i in range(4) if i != j]
        coef = np.linalg.solve(x[:, others].T @ x[:, others] + lam * np.eye(3), x[:, others].T @ x[:, j])
        np.testing.assert_allclose(b[others, j], coef, atol=1e-10)
        assert abs(b[j, j]) < 1e-12
    q = queries([[0, 3], [1], [2, 1, 0]])
    h = history_multi_hot(q, 0, 3, 4).toarray()
    for path in ("dense", "woodbury"):
        scorer = EASE(l2=lam, path=path)
        scorer.fit(TOY)
        np.testing.assert_allclose(scorer.score(q, 0, 3), h @ b, atol=1e-6)


@pytest.mark.parametrize("n_users,n_items,auto_route", [(30, 80, "woodbury"), (80, 30, "dense")])
def test_ease_woodbury_equals_dense(n_users, n_items, auto_route):
    rng = np.random.default_rng(n_items)
    train = interactions(list(zip(*np.nonzero(rng.random((n_users, n_items)) < 0.15), strict=True)), n_users, n_items)
    q = queries([rng.choice(n_items, k, replace=False) for k in (0, 1, 3, 8, 20)])
    h = history_multi_hot(q, 0, len(q), n_items)
    dense, woodbury, auto = EASE(50.0, "dense"), EASE(50.0, "woodbury"), EASE(50.0)
    for scorer in (dense, woodbury, auto):
        scorer.fit(train)
    assert auto.route == auto_route
    np.testing.assert_allclose(woodbury.scores64(h), dense.scores64(h), atol=1e-6)
    np.testing.assert_allclose(woodbury.score(q, 0, len(q)), dense.score(q, 0, len(q)), atol=1e-6)


def test_ease_refuses_when_users_and_items_both_exceed_its_limit():
    rng = np.random.default_rng(0)
    train = interactions(list(zip(*np.nonzero(rng.random((30, 80)) < 0.15), strict=True)), 30, 80)
    with pytest.raises(EASETooLarge, match="both exceed 20"):
        EASE(max_dim=20).fit(train)
    EASE(max_dim=30).fit(train)  # 30 users fit under the limit: the Woodbury route


class FixedScorer(Scorer):
    def __init__(self, scores):
        super().__init__()
        self.scores = np.asarray(scores, np.float32)

    def score(self, queries, start, stop):
        return self.scores[start:stop]


def test_rank_queries_applies_exclusions():
    scores = [[0.9, 0.5, 0.7, 0.1],   # item 0 excluded: target 2 moves up to rank 0
              [0.9, 0.5, 0.7, 0.1],   # the target itself (2) excluded: a miss, ranked n_items
              [0.9, 0.5, 0.7, 0.1]]   # nothing excluded: target 2 is second
    q = queries([[], [], []], targets=[2, 2, 2], excluded=[[0], [2, 3], []])
    ranks = rank_queries(FixedScorer(scores), q, popularity=np.zeros(4))
    np.testing.assert_array_equal(ranks, [0, 4, 1])
    assert retrieval_metrics(ranks, (4,))["recall@4"] == pytest.approx(2 / 3)
    # An excluded item never outranks, even as a tie with popularity on its side.
    q = queries([[]], targets=[1], excluded=[[0]])
    assert rank_queries(FixedScorer([[0.5, 0.5, 0.1, 0.1]]), q, popularity=np.array([9.0, 1, 0, 0]))[0] == 0


N_CYCLE = 20


def cyclic_walks(n_users: int, length: int, seed: int = 0, n: int = N_CYCLE):
    """Every user walks items s, s+1, s+2, ... (mod n) from a random start: (train, queries of the next item)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, n_users)
    pairs = [(u, (s + t) % n) for t in range(length) for u, s in enumerate(starts)]  # time order
    train = interactions(pairs, n_users, n)
    histories = [[(s + t) % n for t in range(length - 1, -1, -1)] for s in starts]  # most recent first
    return train, queries(histories, targets=[(s + length) % n for s in starts], users=np.arange(n_users))


class Shift(Scorer):
    """Scores the item `shift` steps after the newest history item: shift 1 is the cyclic walk's next item."""

    name = "shift"
    refits: list = []

    def __init__(self, shift: int = 0):
        super().__init__(shift=shift)

    @classmethod
    def grid(cls):
        return [{"shift": 0}, {"shift": 1}, {"shift": 2}, {"shift": 1 + N_CYCLE}]

    def fit(self, train, validation=None):
        if validation is None:
            Shift.refits.append((self.params["shift"], len(train)))

    def score(self, queries, start, stop):
        out = np.zeros((stop - start, N_CYCLE), np.float32)
        out[np.arange(stop - start), (queries.history[start:stop, 0] + self.params["shift"]) % N_CYCLE] = 1.0
        return out


def test_select_and_fit_picks_the_best_validation_entry_and_refits_it_on_all_rows():
    fit_train, validation = cyclic_walks(30, 8, seed=1)
    full_train, _ = cyclic_walks(30, 9, seed=1)
    Shift.refits.clear()
    scorer, report = select_and_fit(Shift, fit_train, validation, full_train, metric="ndcg@10")
    assert [c["validation"]["ndcg@10"] < 0.5 for c in report["candidates"]] == [True, False, True, False]
    assert report["chosen"] == {"shift": 1}  # shift 21 ties it: the first in the grid wins
    assert Shift.refits == [(1, len(full_train))] and scorer.params == {"shift": 1}
    assert set(report["candidates"][0]["validation"]) >= {"recall@10", "recall@100", "ndcg@10"}
    json.dumps(report)


def test_select_and_fit_keeps_the_winning_candidate_when_there_is_nothing_more_to_refit_on():
    fit_train, validation = cyclic_walks(30, 8, seed=1)
    Shift.refits.clear()
    scorer, report = select_and_fit(Shift, fit_train, validation, fit_train, metric="ndcg@10")
    assert Shift.refits == [] and scorer.params == {"shift": 1}
    assert report["refit_params"] is None and report["refit_s"] == 0.0
    json.dumps(report)


def test_sasrec_learns_a_cyclic_walk_deterministically():
    train, test = cyclic_walks(48, 24)
    _, validation = cyclic_walks(16, 12, seed=2)
    params = dict(dim=32, blocks=1, heads=1, dropout=0.1, max_len=8, batch_size=32, learning_rate=1e-2, epochs=12,
                  monitor="ndcg@10", seed=3)  # Recall@100 of 20 items is always 1: nothing to stop on
    first, second = SASRec(**params), SASRec(**params)
    first.fit(train, validation)
    second.fit(train, validation)
    assert 1 <= first.tuned_params()["epochs"] <= 12
    np.testing.assert_array_equal(first.score(test, 0, len(test)), second.score(test, 0, len(test)))

    popularity = train.item_counts()
    learned = retrieval_metrics(rank_queries(first, test, popularity), (1,))["recall@1"]
    most_popular = MostPopular()
    most_popular.fit(train)
    baseline = retrieval_metrics(rank_queries(most_popular, test, popularity), (1,))["recall@1"]
    assert learned >= 0.9 and baseline <= 0.2, (learned, baseline)
    assert np.isfinite(first.score(queries([[]], width=3), 0, 1)).all()  # an empty history still gets scores


def test_id_only_scorer_ranks_each_users_repeated_item_first():
    # User u has ad u eight times and ad (u + 1) % 6 once; unseen users (code -1) read the OOV row.
    pairs = [(u, u) for _ in range(8) for u in range(6)] + [(u, (u + 1) % 6) for u in range(6)]
    train = interactions(pairs, 6, 8)
    scorer = IdOnlyScorer(epochs=40, batch_size=16, seed=0)
    scorer.fit(train)
    scores = scorer.score(queries([[]] * 8, users=np.array([0, 1, 2, 3, 4, 5, -1, -1])), 0, 8)
    np.testing.assert_array_equal(scores[:6].argmax(axis=1), np.arange(6))
    np.testing.assert_array_equal(scores[6], scores[7])
    assert not math.isnan(float(scores.sum()))


class Weights:
    """A stand-in model whose weights are the epoch that wrote them."""

    def __init__(self):
        self.epoch = 0

    def get_weights(self):
        return self.epoch

    def set_weights(self, epoch):
        self.epoch = epoch


@pytest.mark.parametrize("min_epochs,kept,ran", [(0, 2, 5), (6, 6, 7)])
def test_run_epochs_stops_on_patience_after_min_epochs_and_restores_the_best(min_epochs, kept, ran):
    from trainer.baselines.epochs import run_epochs

    values = [0.1, 0.2, 0.2, 0.15, 0.2, 0.5, 0.4]  # a plateau after epoch 2, then a late improvement
    model, seen = Weights(), []

    def run_epoch(epoch):
        model.epoch = epoch
        seen.append(epoch)
        return 1.0

    assert run_epochs("t", run_epoch, 7, model, lambda: values[seen[-1] - 1], 3, min_epochs=min_epochs) == kept
    assert model.epoch == kept and seen[-1] == ran
    assert run_epochs("t", run_epoch, 2, model) == 2  # no validation: every epoch runs
