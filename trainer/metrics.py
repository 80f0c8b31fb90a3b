"""Offline metrics computed with numpy: Recall@K and NDCG@K over the whole catalog, AUC, log loss, calibration (ECE)."""

from __future__ import annotations

import numpy as np

TIE_TOLERANCE = 1e-6  # relative: scores this close to the target's count as ties


def ranks_of_targets(scores: np.ndarray, target_columns: np.ndarray, tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """0-based rank of each row's target among all columns, ties counted pessimistically.

    The target goes below every column that scores at least as high, within a relative
    `tolerance`: ads sharing one embedding (e.g. every cold ad in an ID-only model's OOV bucket)
    can score a few ulps apart after a matrix product, and must not pass as ranked ahead of one
    another. A non-finite target score ranks last.
    """
    scores = np.asarray(scores)
    target_scores = scores[np.arange(len(scores)), target_columns][:, None]
    slack = tolerance * np.maximum(np.abs(target_scores), 1.0)
    at_least = (scores >= target_scores - slack).sum(axis=1) - 1  # every other column, ties included
    return np.where(np.isfinite(target_scores[:, 0]), at_least, scores.shape[1] - 1)


def ranks_in_batches(queries: np.ndarray, items: np.ndarray, target_columns: np.ndarray,
                     batch_size: int = 4096) -> np.ndarray:
    """`ranks_of_targets` of dot-product scores (queries @ items^T), a batch of queries at a time so
    the score matrix stays [batch_size, n_items]."""
    return np.concatenate([ranks_of_targets(queries[i:i + batch_size] @ items.T, target_columns[i:i + batch_size])
                           for i in range(0, len(queries), batch_size)] or [np.zeros(0, np.int64)])


def recall_at_k(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    if len(ranks) == 0:
        return {f"recall@{k}": float("nan") for k in ks}
    return {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}


def ndcg_at_k(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """NDCG@K with one relevant item per query: 1 / log2(rank + 2) when rank < K, else 0 (ideal DCG is 1)."""
    if len(ranks) == 0:
        return {f"ndcg@{k}": float("nan") for k in ks}
    gain = 1.0 / np.log2(np.asarray(ranks, dtype=np.float64) + 2.0)
    return {f"ndcg@{k}": float(np.mean(np.where(ranks < k, gain, 0.0))) for k in ks}


def retrieval_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K and NDCG@K of one relevant item per query, from its 0-based ranks."""
    return {**recall_at_k(ranks, ks), **ndcg_at_k(ranks, ks)}


def popularity_ranks(train_counts: np.ndarray, target_columns: np.ndarray) -> np.ndarray:
    """Ranks under a most-popular ranker, the same list for every user."""
    return ranks_of_targets(np.broadcast_to(train_counts, (len(target_columns), len(train_counts))),
                            target_columns)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic with average ranks for ties."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = starts + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probabilities, eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width probability bins: count, mean predicted probability and observed rate per bin."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.float64)
    which = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=n_bins) / count
        rate = np.bincount(which, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "mean_predicted": mean_p,
            "observed_rate": rate}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean |observed rate - mean predicted probability| over equal-width bins."""
    if len(labels) == 0:
        return float("nan")
    bins = reliability_bins(labels, probabilities, n_bins)
    used = bins["count"] > 0
    gaps = np.abs(bins["observed_rate"][used] - bins["mean_predicted"][used])
    return float(np.sum(bins["count"][used] * gaps) / bins["count"].sum())


def ranks_with_exclusions(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray],
                          popularity: np.ndarray, tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """0-based rank of each row's target among the columns it may be given, the same rule for every method.

    `excluded[i]`: the columns row i may not return (they rank nowhere); a target among them, or with
    a non-finite score, counts as ranked last (`scores.shape[1]`, a miss at every K). Scores within
    `tolerance` (relative) of the target's are ties, broken by `popularity` (training positives per
    column, higher first); what still ties counts against the target.
    """
    scores = np.array(scores, dtype=np.float64)
    n, n_items = scores.shape
    rows = np.arange(n)
    for i, cols in enumerate(excluded):
        if len(cols):
            scores[i, cols] = -np.inf
    target_scores = scores[rows, targets][:, None]
    slack = tolerance * np.maximum(np.abs(target_scores), 1.0)
    with np.errstate(invalid="ignore"):  # an excluded target (-inf, infinite slack) compares as NaN; set below
        above = scores > target_scores + slack
        tie = ~above & (scores >= target_scores - slack)
    pop = np.asarray(popularity, np.float64)
    target_pop = pop[targets][:, None]
    ahead = above | (tie & (pop[None, :] >= target_pop))
    ranks = ahead.sum(axis=1) - 1  # the target itself is always counted once
    return np.where(np.isfinite(target_scores[:, 0]), ranks, n_items)


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank of one relevant item per query (a miss, rank = n_items, adds ~0)."""
    return float(np.mean(1.0 / (np.asarray(ranks, np.float64) + 1.0))) if len(ranks) else float("nan")
