"""The epoch loop of the trained baselines: early stopping on the validation queries, best weights kept.

A method that trains by epochs picks its epoch count on the validation split: train up to `epochs`,
evaluate after each one, stop after `patience` epochs without a better value, and restore the
weights of the best epoch. That count is what the runner refits with on all training rows, where
there is no validation split and exactly that many epochs are run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from features.interactions import Queries
from trainer.baselines.base import Scorer, rank_queries
from trainer.metrics import retrieval_metrics
from trainer.progress import log

EARLY_STOPPING_METRIC = "recall@100"


def validation_metric(scorer: Scorer, validation: Queries, popularity: np.ndarray,
                      metric: str = EARLY_STOPPING_METRIC) -> float:
    """`metric` of `scorer` on the validation queries, ranked like every evaluation (`rank_queries`)."""
    k = int(metric.split("@")[1])
    return retrieval_metrics(rank_queries(scorer, validation, popularity), (k,))[metric]


def run_epochs(name: str, run_epoch: Callable[[int], float], epochs: int, model,
               evaluate: Callable[[], float] | None = None, patience: int = 3,
               monitor: str = EARLY_STOPPING_METRIC, min_epochs: int = 0) -> int:
    """Train up to `epochs` epochs (`run_epoch(epoch)` returns the epoch's mean loss) and return the count kept.

    With `evaluate`, stops once `patience` epochs in a row bring no higher value (never before
    `min_epochs`: a model may sit on a validation plateau early on, e.g. while it only knows
    popularity) and sets `model` back to the weights of the best epoch, whose number is returned;
    without it, runs all.
    """
    best_value, best_epoch, best_weights = -np.inf, 0, None
    for epoch in range(1, epochs + 1):
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss = run_epoch(epoch)
        line = (f"{name} epoch {epoch}/{epochs}: loss {loss:.4f}, {time.perf_counter() - t0:.1f}s "
                f"(cpu {time.process_time() - cpu0:.1f}s)")
        if evaluate is None:
            log(line, sys.stderr)
            continue
        value = evaluate()
        log(f"{line}, validation {monitor} {value:.4f}", sys.stderr)
        if best_weights is None or value > best_value:
            best_value, best_epoch, best_weights = value, epoch, model.get_weights()
        elif epoch - best_epoch >= patience and epoch >= min_epochs:
            break
    if evaluate is None:
        return epochs
    model.set_weights(best_weights)
    return best_epoch
