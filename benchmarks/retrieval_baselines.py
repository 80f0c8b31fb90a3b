"""Retrieval baselines on MovieLens (ml-latest-small), each tuned on a validation split, under one protocol.

Every rating is a positive. `--protocol random`: a seeded random 80/20 split of the rows, each
held-out row one query; `leave_last_out`: each user's last positive by time is the query's target.
A query's history is the user's training positives, most recent first, truncated to `--history`;
its exclusions are all of the user's training positives. The validation split is carved from the
training rows the same way (random: 10 % of them; leave-last-out: each user's last training
positive), every method's grid is searched on it (`select_and_fit`), and the chosen parameters are
refitted on all training rows. Prints Recall@10, Recall@100 and NDCG@10 on the test queries with
the wall time of tuning, of the refit and of scoring, and writes the numbers as JSON.

    .venv/bin/python benchmarks/retrieval_baselines.py --protocol random
    .venv/bin/python benchmarks/retrieval_baselines.py --protocol leave_last_out --scorers most_popular,ease
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"
SCORERS = ("most_popular", "itemknn", "ease", "sasrec", "id_only")


def split_rows(rows: pd.DataFrame, protocol: str, share: float, rng: np.random.Generator):
    """(kept, held out): a random `share` of rows, or each user's last row by time."""
    if protocol == "random":
        held = np.zeros(len(rows), bool)
        held[rng.permutation(len(rows))[:round(share * len(rows))]] = True
    else:
        last = rows.reset_index(drop=True).sort_values(["timestamp"], kind="stable").groupby("userId").tail(1)
        held = np.zeros(len(rows), bool)
        held[last.index.to_numpy()] = True
    return rows[~held].reset_index(drop=True), rows[held].reset_index(drop=True)


def build(train: pd.DataFrame, held: pd.DataFrame, catalog: pd.Index, history: int):
    """Interactions of `train` and one query per `held` row (history, exclusions from `train`)."""
    from features.interactions import Interactions, Queries, exclusion_lists

    train = train.sort_values("timestamp", kind="stable")
    user_ids = np.unique(train["userId"].to_numpy())
    users = np.searchsorted(user_ids, train["userId"].to_numpy())
    items = catalog.get_indexer(train["movieId"])
    interactions = Interactions(users, items, train["timestamp"].to_numpy(), len(user_ids), len(catalog),
                                [str(u) for u in user_ids], [str(m) for m in catalog])
    newest_first = [s[::-1] for s in interactions.sequences()]
    code = {u: i for i, u in enumerate(user_ids)}
    q_users = np.array([code.get(u, -1) for u in held["userId"]], np.int32)
    hist = np.full((len(held), history), -1, np.int32)
    excluded = []
    for i, u in enumerate(q_users):
        seq = newest_first[u] if u >= 0 else np.zeros(0, np.int32)
        hist[i, :min(history, len(seq))] = seq[:history]
        excluded.append(np.unique(seq))
    indptr, excl = exclusion_lists(excluded)
    return interactions, Queries(hist, q_users, catalog.get_indexer(held["movieId"]), indptr, excl)


def scorer_classes(names: list[str]):
    from trainer.baselines import EASE, IdOnlyScorer, ItemKNN, MostPopular, SASRec

    table = {"most_popular": MostPopular, "itemknn": ItemKNN, "ease": EASE, "sasrec": SASRec, "id_only": IdOnlyScorer}
    return [table[n] for n in names]


def _chosen(report: dict) -> dict:
    """The grid entry chosen, with the epoch count early stopping kept (if the method trains by epochs)."""
    epochs = {"epochs": report["refit_params"]["epochs"]} if "epochs" in report["refit_params"] else {}
    return {**report["chosen"], **epochs}


class _Timed:
    """Wraps a scorer to add up the seconds spent in `score` (ranking time is measured apart)."""

    def __init__(self, scorer):
        self.scorer, self.seconds = scorer, 0.0

    def score(self, queries, start, stop):
        t0 = time.perf_counter()
        out = self.scorer.score(queries, start, stop)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=("random", "leave_last_out"), default="random")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--users", type=int, default=0, help="keep the first N users (0: all), for a quick run")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "retrieval_baselines.json")
    args = ap.parse_args()

    from trainer.baselines import EASETooLarge, rank_queries, select_and_fit
    from trainer.metrics import retrieval_metrics

    ratings = pd.read_csv(args.data / "ratings.csv")
    catalog = pd.Index(pd.read_csv(args.data / "movies.csv")["movieId"])
    if args.users:
        ratings = ratings[ratings["userId"].isin(np.unique(ratings["userId"])[:args.users])]
    rng = np.random.default_rng(args.seed)
    train_rows, test_rows = split_rows(ratings, args.protocol, 0.2, rng)
    fit_rows, val_rows = split_rows(train_rows, args.protocol, 0.1, rng)
    fit_train, validation = build(fit_rows, val_rows, catalog, args.history)
    full_train, test = build(train_rows, test_rows, catalog, args.history)
    print(f"{args.protocol}: {len(full_train)} training positives ({len(fit_train)} fit + {len(validation)} "
          f"validation), {len(test)} test queries, {len(catalog)} items, {full_train.n_users} users", flush=True)

    results = {}
    for cls in scorer_classes(args.scorers.split(",")):
        t0 = time.perf_counter()
        try:
            scorer, report = select_and_fit(cls, fit_train, validation, full_train, fit_train.item_counts())
        except EASETooLarge as e:
            print(f"EASE skipped: {e}", flush=True)
            continue
        tune_s = time.perf_counter() - t0 - report["refit_s"]
        timed = _Timed(scorer)
        t0 = time.perf_counter()
        ranks = rank_queries(timed, test, full_train.item_counts())
        rank_s = time.perf_counter() - t0
        results[cls.name] = {**retrieval_metrics(ranks, (10, 100)), "tune_s": round(tune_s, 1),
                             "fit_s": report["refit_s"], "score_s": round(timed.seconds, 2),
                             "score_and_rank_s": round(rank_s, 2), "tuning": report}
    print(f"\n{'':14s}{'Recall@10':>10s}{'Recall@100':>11s}{'NDCG@10':>9s}{'tune s':>8s}{'fit s':>8s}"
          f"{'score s':>9s}  chosen")
    for name, r in results.items():
        print(f"{name:14s}{r['recall@10']:10.4f}{r['recall@100']:11.4f}{r['ndcg@10']:9.4f}{r['tune_s']:8.1f}"
              f"{r['fit_s']:8.1f}{r['score_s']:9.2f}  {_chosen(r['tuning'])}")
    write_report(args.out, "retrieval_baselines", protocol=args.protocol, seed=args.seed, history=args.history,
                 training_positives=len(full_train), test_queries=len(test), results=results)


if __name__ == "__main__":
    main()
