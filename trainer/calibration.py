"""Probability calibration fitted on held-out rows and applied inside the exported graphs.

`Calibrator` maps a raw logit to a calibrated probability with a monotone piecewise-linear
function of the logit, held in two non-trainable weights of fixed size (so it checkpoints and
exports like any layer and needs only core TF ops in the served graph):

- `isotonic`: pool-adjacent-violators on the held-out (logit, label) pairs, summarised at
  `knots` logit quantiles and interpolated linearly between them (flat beyond the ends); knots
  rise by at least 1e-5 each, so the map is strictly increasing and never ties two candidates;
- `platt`: a fitted sigmoid(a * logit + b), tabulated at the same knots (dense enough that the
  interpolation error is far below the ECE it fixes);
- `none`: sigmoid(logit), tabulated the same way (identity up to the interpolation).

The fit happens once after training (`fit`), on rows the model never trained on and that are
not the test split.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

METHODS = ("isotonic", "platt", "none")
ROWS_PER_KNOT = 250  # isotonic: held-out rows per knot (64 knots from 16,000 rows on)
MIN_STEP = 1e-5  # smallest rise between consecutive isotonic knots (keeps the map strictly monotone)


def sigmoid(x):
    """The logistic function on numpy values."""
    return 1.0 / (1.0 + np.exp(-x))


def pool_adjacent_violators(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """The non-decreasing least-squares fit to `y` (already ordered by score), weights `w`."""
    y = np.asarray(y, np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    means, weights, sizes = [], [], []
    for yi, wi in zip(y, w, strict=True):
        means.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, s2 = means.pop(), weights.pop(), sizes.pop()
            m1, w1, s1 = means.pop(), weights.pop(), sizes.pop()
            means.append((m1 * w1 + m2 * w2) / (w1 + w2))
            weights.append(w1 + w2)
            sizes.append(s1 + s2)
    return np.repeat(means, sizes)


def fit_platt(logits: np.ndarray, labels: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit + b) by Newton's method on the log loss (tiny L2 for stability)."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    a, b = 1.0, 0.0
    for _ in range(iterations):
        p = sigmoid(a * x + b)
        g = np.array([np.sum((p - y) * x) + 1e-6 * a, np.sum(p - y) + 1e-6 * b])
        s = p * (1 - p)
        h = np.array([[np.sum(s * x * x) + 1e-6, np.sum(s * x)], [np.sum(s * x), np.sum(s) + 1e-6]])
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-9:
            break
    return float(a), float(b)


def fit_knots(logits: np.ndarray, labels: np.ndarray, method: str, knots: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Knot positions (logits, increasing) and calibrated probabilities at them."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {METHODS}")
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if len(x) == 0 or method == "none":
        grid = np.linspace(-12.0, 12.0, knots)
        return grid.astype(np.float32), sigmoid(grid).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if method == "platt":
        a, b = fit_platt(x, y)
        grid = np.linspace(lo - 1.0, hi + 1.0, knots)
        return grid.astype(np.float32), sigmoid(a * grid + b).astype(np.float32)
    order = np.argsort(x, kind="mergesort")
    xs, fitted = x[order], pool_adjacent_violators(y[order])
    uniq, start = np.unique(xs, return_index=True)  # tied scores share one level
    level = np.add.reduceat(fitted, start) / np.diff(np.append(start, len(xs)))
    # At most one knot per ROWS_PER_KNOT rows: on a small held-out set the PAV steps are noise, and
    # knots close together would turn them into cliffs that amplify tiny logit differences.
    used = int(np.clip(len(xs) // ROWS_PER_KNOT, 4, knots))
    grid = np.unique(np.quantile(xs, np.linspace(0.0, 1.0, used)))
    # Strictly increasing (by MIN_STEP per knot): flat isotonic steps would tie ads that the model
    # ranks apart, and calibration must never reorder or merge candidates.
    steps = MIN_STEP * np.arange(len(grid))
    values = np.maximum.accumulate(np.interp(grid, uniq, level) - steps) + steps
    pad = knots - len(grid)  # few distinct scores: repeat the last knot (a flat end)
    grid, values = np.pad(grid, (0, pad), mode="edge"), np.pad(values, (0, pad), mode="edge")
    return grid.astype(np.float32), np.clip(values, 1e-6, 1 - 1e-6).astype(np.float32)


class Calibrator(tf.keras.layers.Layer):
    """Logit -> calibrated probability by monotone piecewise-linear interpolation (in-graph)."""

    def __init__(self, knots: int = 64, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.knots = knots
        grid = np.linspace(-12.0, 12.0, knots)
        self.knot_logits = self.add_weight(name="knot_logits", shape=(knots,), trainable=False,
                                           initializer=tf.keras.initializers.Constant(grid))
        self.knot_probs = self.add_weight(name="knot_probs", shape=(knots,), trainable=False,
                                          initializer=tf.keras.initializers.Constant(sigmoid(grid)))
        self.method = "none"

    def fit(self, logits: np.ndarray, labels: np.ndarray, method: str) -> None:
        grid, probs = fit_knots(logits, labels, method, self.knots)
        self.knot_logits.assign(grid)
        self.knot_probs.assign(probs)
        self.method = method

    def call(self, logits):
        x = tf.cast(logits, tf.float32)
        xs, ys = self.knot_logits, self.knot_probs
        n = tf.shape(xs)[0]
        flat = tf.reshape(x, [-1])
        right = tf.clip_by_value(tf.searchsorted(xs, flat, side="right"), 1, n - 1)
        x0, x1 = tf.gather(xs, right - 1), tf.gather(xs, right)
        y0, y1 = tf.gather(ys, right - 1), tf.gather(ys, right)
        t = tf.clip_by_value((flat - x0) / tf.maximum(x1 - x0, 1e-12), 0.0, 1.0)
        return tf.reshape(y0 + t * (y1 - y0), tf.shape(x))

    def numpy_call(self, logits: np.ndarray) -> np.ndarray:
        xs, ys = self.knot_logits.numpy(), self.knot_probs.numpy()
        return np.interp(np.asarray(logits, np.float64), xs, ys).astype(np.float32)
