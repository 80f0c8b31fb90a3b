"""Offline metrics computed with numpy: Recall@K and NDCG@K over the whole catalog, AUC, log loss, calibration (ECE)."""

from __future__ import annotations

import numpy as np
import pandas as pd

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


def per_user_metrics(ranks: np.ndarray, users: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K and NDCG@K per user, averaged over users: the convention of published random-split results
    (Liang et al. 2018, Steck 2019), where all of a user's held-out items are relevant to one ranked list.

    Recall@K = hits / min(K, n_u) and NDCG@K's ideal list puts min(K, n_u) hits on top, so a user with
    more held-out items than K can still score 1. Computed from per-query ranks, which is exact only when
    every query of a user is ranked from the same list (the same history and no per-query context).
    """
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {f"user_{m}@{k}": float("nan") for k in ks for m in ("recall", "ndcg")}
    _, inverse = np.unique(np.asarray(users).astype(str), return_inverse=True)
    n_u = np.bincount(inverse)
    gain = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
    out = {}
    for k in ks:
        hit = ranks < k
        ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(k, n_u) - 1]
        out[f"user_recall@{k}"] = float(np.mean(np.bincount(inverse, weights=hit) / np.minimum(k, n_u)))
        out[f"user_ndcg@{k}"] = float(np.mean(np.bincount(inverse, weights=np.where(hit, gain, 0.0)) / ideal))
    return out


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


def _group_codes(groups) -> tuple[np.ndarray, int]:
    """Dense codes 0..G-1 of `groups` (any hashable values, e.g. user ids) and G."""
    codes, uniques = pd.factorize(np.asarray(groups, dtype=object))
    return codes, len(uniques)


def per_group_auc(labels: np.ndarray, scores: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """AUC of each group (e.g. user) and its row count; NaN where a group lacks a positive or a negative."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    codes, n_groups = _group_codes(groups)
    order = np.argsort(codes, kind="mergesort")
    bounds = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0, True])
    out = np.full(n_groups, np.nan)
    sizes = np.zeros(n_groups, np.int64)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        rows = order[start:stop]
        g = codes[rows[0]]
        sizes[g] = len(rows)
        y = labels[rows]
        if y.any() and not y.all():
            out[g] = auc(y, scores[rows])
    return out, sizes


def group_auc(labels: np.ndarray, scores: np.ndarray, groups) -> dict:
    """User-weighted AUC (gAUC): each group's AUC weighted by its row count, over the groups that have
    both a positive and a negative row (`groups` and `rows` count those)."""
    per, sizes = per_group_auc(labels, scores, groups)
    used = ~np.isnan(per)
    if not used.any():
        return {"gauc": float("nan"), "groups": 0, "rows": 0}
    return {"gauc": float(np.sum(per[used] * sizes[used]) / sizes[used].sum()), "groups": int(used.sum()),
            "rows": int(sizes[used].sum())}


def _weighted_auc_parts(labels: np.ndarray, scores: np.ndarray):
    """Precomputation for `_weighted_auc`: each row's tied-score block and the blocks' label masks."""
    _, block = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    return block, np.asarray(labels).astype(bool)


def _weighted_auc(block: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUC with row weights (ties count 1/2), from `_weighted_auc_parts`."""
    n_blocks = block.max() + 1 if len(block) else 0
    pos = np.bincount(block, weights=weights * labels, minlength=n_blocks)
    neg = np.bincount(block, weights=weights * ~labels, minlength=n_blocks)
    below = np.cumsum(neg) - neg  # negatives strictly below each block
    total = pos.sum() * neg.sum()
    return float((np.sum(pos * below) + 0.5 * np.sum(pos * neg)) / total) if total > 0 else float("nan")


def paired_bootstrap(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, probs_a: np.ndarray,
                     probs_b: np.ndarray, groups, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Intervals of the differences a - b in gAUC, AUC and log loss, resampling groups (users) with
    replacement: one RNG seed, the same resamples for both models, so the interval is of the paired
    difference. `scores_*` rank (AUC, gAUC); `probs_*` are the probabilities log loss scores."""
    labels = np.asarray(labels).astype(bool)
    codes, n_groups = _group_codes(groups)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
                       for _ in range(n_resamples)]).astype(np.float64)  # [resamples, groups]
    out = {}
    per_a, sizes = per_group_auc(labels, scores_a, codes)
    per_b, _ = per_group_auc(labels, scores_b, codes)
    used = ~np.isnan(per_a) & ~np.isnan(per_b)
    w = counts[:, used] * sizes[used]
    diffs = {"gauc": (w @ per_a[used] - w @ per_b[used]) / np.maximum(w.sum(axis=1), 1e-12)}

    def row_loss(p):
        p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
        return -(labels * np.log(p) + ~labels * np.log(1 - p))

    loss_sum = np.bincount(codes, weights=row_loss(probs_a) - row_loss(probs_b), minlength=n_groups)
    diffs["logloss"] = (counts @ loss_sum) / (counts @ np.bincount(codes, minlength=n_groups))
    parts_a, parts_b = _weighted_auc_parts(labels, scores_a), _weighted_auc_parts(labels, scores_b)
    diffs["auc"] = np.array([_weighted_auc(*parts_a, c[codes]) - _weighted_auc(*parts_b, c[codes]) for c in counts])
    point = {"gauc": group_auc(labels, scores_a, codes)["gauc"] - group_auc(labels, scores_b, codes)["gauc"],
             "auc": auc(labels, scores_a) - auc(labels, scores_b),
             "logloss": log_loss(labels, probs_a) - log_loss(labels, probs_b)}
    tail = (1.0 - level) / 2.0
    for name, d in diffs.items():
        lo, hi = np.quantile(d, [tail, 1.0 - tail])
        out[name] = {"difference": float(point[name]), "low": float(lo), "high": float(hi)}
    out.update({"resamples": n_resamples, "seed": seed, "level": level, "groups": int(n_groups)})
    return out


def bootstrap_gauc_difference(labels: np.ndarray, runs_a: list[np.ndarray], runs_b: list[np.ndarray], groups,
                              n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """gAUC of arm a minus arm b, each arm's gAUC the mean over its runs (e.g. one per training seed),
    with a paired bootstrap interval that resamples groups (users) with replacement.

    Every resample reweights the same users for every run of both arms, so the interval is of the paired
    difference; averaging an arm's seeds first keeps one lucky seed from deciding it (an arm with one run,
    such as a deterministic baseline, is just that run). Groups without both labels carry no AUC and drop
    out, as in `group_auc`."""
    if not runs_a or not runs_b:
        raise ValueError("each arm needs at least one run's scores")
    labels = np.asarray(labels).astype(bool)
    codes, n_groups = _group_codes(groups)
    per_a = [per_group_auc(labels, s, codes) for s in runs_a]
    per_b = [per_group_auc(labels, s, codes) for s in runs_b]
    sizes = per_a[0][1]
    used = ~np.isnan(per_a[0][0])  # NaN depends on the labels only: the same groups for every run
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
                       for _ in range(n_resamples)]).astype(np.float64)  # [resamples, groups]

    def arm_gauc(per_runs, weights):  # weights [R, used groups] -> [R]: mean over runs of the weighted mean
        total = np.maximum(weights.sum(axis=1), 1e-12)
        return np.mean([weights @ per[used] / total for per, _ in per_runs], axis=0)

    weights = counts[:, used] * sizes[used]
    diffs = arm_gauc(per_a, weights) - arm_gauc(per_b, weights)
    point = float((arm_gauc(per_a, sizes[used][None, :].astype(np.float64))
                   - arm_gauc(per_b, sizes[used][None, :].astype(np.float64)))[0])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return {"difference": point, "low": float(low), "high": float(high), "runs_a": len(runs_a),
            "runs_b": len(runs_b), "resamples": n_resamples, "seed": seed, "level": level, "groups": int(used.sum())}
