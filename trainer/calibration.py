"""Probability calibration fitted on held-out rows and applied inside the exported graphs.

`Calibrator` maps a raw logit x to a calibrated probability, held in non-trainable weights of fixed
size (so it checkpoints and exports like any layer and needs only core TF ops in the served graph):

- `beta` (the default; Kull et al. 2017, "Beyond sigmoids"): sigmoid(b * softplus(x) - a * softplus(-x)
  + c), i.e. a * ln p - b * ln(1 - p) + c on the logit scale, with a, b >= MIN_SLOPE: smooth and
  strictly increasing everywhere (its slope is at least min(a, b)), three parameters, so it fixes
  a shifted base rate and over- or under-confidence on either side without plateaus;
- `platt`: sigmoid(a * x + c), the same with a = b;
- `isotonic`: pool-adjacent-violators summarised at up to `knots` logit quantiles and interpolated
  linearly (flat beyond the ends); knots rise by at least 1e-5, so it never ties two candidates
  inside its range, but its steps are nearly flat: eCPM then orders those candidates by bid alone;
- `none`: sigmoid(x).

Fits take per-row weights (recency weights make the map follow the latest base rate). Which rows
a map is fitted on, and whether it is applied at all, is decided in `trainer.evaluate.fit_calibration`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

METHODS = ("beta", "platt", "isotonic", "none")
PARAMETRIC = ("beta", "platt", "none")
MIN_SLOPE = 0.05  # beta/platt: a, b >= this, so the map is strictly increasing with a usable slope
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


def beta_features(logits) -> np.ndarray:
    """[ln p, -ln(1 - p)] of p = sigmoid(logit), computed stably: the beta map is linear in them."""
    x = np.asarray(logits, np.float64)
    return np.stack([-np.logaddexp(0.0, -x), np.logaddexp(0.0, x)], axis=-1)


def fit_parametric(logits: np.ndarray, labels: np.ndarray, method: str, weights: np.ndarray | None = None
                   ) -> tuple[float, float, float]:
    """(a, b, c) of the beta map (platt: a = b) minimising the weighted log loss, a, b >= MIN_SLOPE.

    A tiny L2 pull towards the identity (1, 1, 0) keeps the fit defined on degenerate data
    (e.g. one label only)."""
    from scipy.optimize import minimize

    if method == "none" or len(logits) == 0:
        return 1.0, 1.0, 0.0
    f = beta_features(logits)
    y = np.asarray(labels, np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    ridge = 1e-6

    def unpack(theta):
        return (theta[0], theta[0], theta[1]) if method == "platt" else tuple(theta)

    def loss(theta):
        a, b, c = unpack(theta)
        z = a * f[:, 0] + b * f[:, 1] + c
        p = sigmoid(z)
        value = np.sum(w * (np.logaddexp(0.0, z) - y * z))
        g = w * (p - y)
        grads = np.array([g @ f[:, 0], g @ f[:, 1], g.sum()])
        reg = np.array([a - 1.0, b - 1.0, c])
        value += 0.5 * ridge * reg @ reg
        grads += ridge * reg
        if method == "platt":
            grads = np.array([grads[0] + grads[1], grads[2]])
        return value, grads

    start = np.array([1.0, 0.0]) if method == "platt" else np.array([1.0, 1.0, 0.0])
    bounds = [(MIN_SLOPE, None), (None, None)] if method == "platt" else [(MIN_SLOPE, None)] * 2 + [(None, None)]
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return tuple(float(v) for v in unpack(result.x))


def apply_parametric(params, logits) -> np.ndarray:
    a, b, c = params
    f = beta_features(logits)
    return sigmoid(a * f[..., 0] + b * f[..., 1] + c)


def fit_knots(logits: np.ndarray, labels: np.ndarray, method: str, knots: int,
              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Knot positions (logits, increasing) and calibrated probabilities at them: the isotonic map,
    or any parametric one tabulated on [min - 1, max + 1] of the logits."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {METHODS}")
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if len(x) == 0 or method == "none":
        grid = np.linspace(-12.0, 12.0, knots)
        return grid.astype(np.float32), sigmoid(grid).astype(np.float32)
    if method != "isotonic":
        grid = np.linspace(float(x.min()) - 1.0, float(x.max()) + 1.0, knots)
        probs = apply_parametric(fit_parametric(x, y, method, weights), grid)
        return grid.astype(np.float32), probs.astype(np.float32)
    order = np.argsort(x, kind="mergesort")
    xs, fitted = x[order], pool_adjacent_violators(y[order], None if weights is None else np.asarray(weights)[order])
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
    """Logit -> calibrated probability, in-graph: the beta/platt map from its three parameters, or
    the isotonic map by monotone piecewise-linear interpolation of its knots (`use_knots`)."""

    def __init__(self, knots: int = 64, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.knots = knots
        grid = np.linspace(-12.0, 12.0, knots)
        self.params = self.add_weight(name="params", shape=(3,), trainable=False,
                                      initializer=tf.keras.initializers.Constant([1.0, 1.0, 0.0]))
        self.use_knots = self.add_weight(name="use_knots", shape=(), trainable=False,
                                         initializer=tf.keras.initializers.Zeros())
        # Added to a logit before the map: moves a map fitted on one model's logits onto another's whose
        # logits are offset (e.g. where a position tower took a different share of the intercept).
        self.offset = self.add_weight(name="offset", shape=(), trainable=False,
                                      initializer=tf.keras.initializers.Zeros())
        self.knot_logits = self.add_weight(name="knot_logits", shape=(knots,), trainable=False,
                                           initializer=tf.keras.initializers.Constant(grid))
        self.knot_probs = self.add_weight(name="knot_probs", shape=(knots,), trainable=False,
                                          initializer=tf.keras.initializers.Constant(sigmoid(grid)))
        self.method = "none"
        self.built = True  # every weight exists already (and an unused pCVR head is still saved whole)

    def get_config(self) -> dict:
        """The constructor's arguments (`dtype` left out: the layer fixes float32 itself); `from_config`
        rebuilds an unfitted calibrator, the fitted map being weights."""
        return {**{k: v for k, v in super().get_config().items() if k != "dtype"}, "knots": int(self.knots)}

    def fit(self, logits: np.ndarray, labels: np.ndarray, method: str, weights: np.ndarray | None = None,
            offset: float = 0.0) -> None:
        """Fit the map on (logit, label) pairs; served logits are moved by `offset` before it."""
        self.offset.assign(float(offset))
        if method not in METHODS:
            raise ValueError(f"calibration method {method!r}: expected one of {METHODS}")
        if method == "isotonic":
            grid, probs = fit_knots(logits, labels, method, self.knots, weights)
            self.knot_logits.assign(grid)
            self.knot_probs.assign(probs)
            self.use_knots.assign(1.0)
        else:
            self.params.assign(fit_parametric(logits, labels, method, weights))
            self.use_knots.assign(0.0)
        self.method = method

    def reset(self) -> None:
        """Back to sigmoid(logit): no calibration."""
        self.fit(np.zeros(0), np.zeros(0), "none")

    def call(self, logits):
        x = tf.cast(logits, tf.float32) + self.offset
        a, b, c = self.params[0], self.params[1], self.params[2]
        parametric = tf.sigmoid(b * tf.nn.softplus(x) - a * tf.nn.softplus(-x) + c)
        xs, ys = self.knot_logits, self.knot_probs
        n = tf.shape(xs)[0]
        flat = tf.reshape(x, [-1])
        right = tf.clip_by_value(tf.searchsorted(xs, flat, side="right"), 1, n - 1)
        x0, x1 = tf.gather(xs, right - 1), tf.gather(xs, right)
        y0, y1 = tf.gather(ys, right - 1), tf.gather(ys, right)
        t = tf.clip_by_value((flat - x0) / tf.maximum(x1 - x0, 1e-12), 0.0, 1.0)
        interpolated = tf.reshape(y0 + t * (y1 - y0), tf.shape(x))
        return tf.where(self.use_knots > 0.5, interpolated, parametric)

    def numpy_call(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, np.float64) + float(self.offset.numpy())
        if self.use_knots.numpy() > 0.5:
            return np.interp(x, self.knot_logits.numpy(), self.knot_probs.numpy()).astype(np.float32)
        return apply_parametric(self.params.numpy().astype(np.float64), x).astype(np.float32)
