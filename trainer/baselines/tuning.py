"""Hyperparameters chosen on the validation split, then one refit on all training rows.

Every candidate of a method's `grid()` is fitted on the rows left after carving the validation
split, ranked on the validation queries exactly as the test queries will be (`rank_queries`), and
the best by one metric wins (ties: the first in the grid). The winner is refitted from scratch on
all training rows with its `tuned_params()` (e.g. the epoch count early stopping chose), so the
test rows never take part in a choice. When the rows to refit on are the candidates' own rows
(no refit), the winning candidate itself is kept: fitting it again would learn the same thing.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from features.interactions import Interactions, Queries
from trainer.baselines.base import Scorer, rank_queries
from trainer.metrics import retrieval_metrics
from trainer.progress import log

VALIDATION_KS = (10, 100)  # and the K of `metric`


def _plain(value):
    """numpy scalars -> Python numbers, so the report is JSON-serialisable."""
    return value.item() if isinstance(value, np.generic) else value


def select_and_fit(scorer_cls: type[Scorer], fit_train: Interactions, validation: Queries, full_train: Interactions,
                   popularity: np.ndarray | None = None, metric: str = "recall@100") -> tuple[Scorer, dict]:
    """Grid search on `validation`, refit of the winner on `full_train`: (fitted scorer, report).

    `popularity` breaks validation score ties (default: `fit_train`'s counts, the rows the
    candidates learn from). The report lists each candidate's params, tuned params, validation
    Recall@K and NDCG@K (K = 10, 100 and that of `metric`) and fit seconds, then the choice and the refit's seconds.
    """
    popularity = fit_train.item_counts() if popularity is None else popularity
    ks = tuple(sorted({*VALIDATION_KS, int(metric.split("@")[1])}))
    candidates, best, best_scorer = [], None, None
    for i, params in enumerate(scorer_cls.grid()):
        scorer = scorer_cls(**params)
        t0 = time.perf_counter()
        scorer.fit(fit_train, validation)
        fit_s = time.perf_counter() - t0
        metrics = retrieval_metrics(rank_queries(scorer, validation, popularity), ks)
        candidates.append({"params": {k: _plain(v) for k, v in params.items()},
                           "tuned_params": {k: _plain(v) for k, v in scorer.tuned_params().items()},
                           "validation": metrics, "fit_s": round(fit_s, 3)})
        log(f"{scorer_cls.name} candidate {i + 1}: {params} -> validation {metric} {metrics[metric]:.4f} "
            f"(fit {fit_s:.1f}s)", sys.stderr)
        value = metrics[metric]
        if best is None or (not math.isnan(value) and not value <= candidates[best]["validation"][metric]):
            best = i
            best_scorer = scorer if full_train is fit_train else None  # one fitted model kept at a time
        del scorer
    chosen = candidates[best]
    if best_scorer is not None:
        log(f"{scorer_cls.name}: chose {chosen['params']}, kept as fitted (no refit: the same training rows)",
            sys.stderr)
        return best_scorer, {"scorer": scorer_cls.name, "metric": metric, "candidates": candidates,
                             "chosen": chosen["params"], "refit_params": None, "refit_s": 0.0}
    final = scorer_cls(**chosen["tuned_params"])
    t0 = time.perf_counter()
    final.fit(full_train)
    refit_s = time.perf_counter() - t0
    log(f"{scorer_cls.name}: chose {chosen['params']}, refit on all training rows in {refit_s:.1f}s", sys.stderr)
    return final, {"scorer": scorer_cls.name, "metric": metric, "candidates": candidates, "chosen": chosen["params"],
                   "refit_params": chosen["tuned_params"], "refit_s": round(refit_s, 3)}
