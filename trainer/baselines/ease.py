"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): an item-item linear model.

B = argmin ||X - XB||² + λ||B||² subject to diag(B) = 0 has the closed form P = (XᵀX + λI)⁻¹,
B_ij = -P_ij / P_jj, B_jj = 0; a query's scores are h·B, h the multi-hot of its distinct history
items. Both routes below are exact (float64 inverse), and the cheaper one is taken:

* dense (n_items <= n_users): invert the n_items x n_items Gram matrix and keep B;
* Woodbury (n_users < n_items): with M = (λI + XXᵀ)⁻¹ (n_users x n_users), P = (I - XᵀMX)/λ,
  diag(P) = (1 - colsum(X ∘ MX))/λ and h·P = (h - (hXᵀ)MX)/λ, so h·B = h - (h·P)/diag(P) without
  ever forming B (the self term cancels: h_j - h_j P_jj / P_jj = 0, as B_jj = 0 demands).

Both cost a dense float64 inverse of side min(n_items, n_users); past `max_dim` on both sides fit
raises `EASETooLarge`, which a runner reports as "EASE skipped: ...".
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy import sparse

from features.interactions import Interactions, Queries
from trainer.baselines.base import Scorer, history_multi_hot

MAX_DIM = 20_000
BLOCK_ELEMENTS = 1 << 24


class EASETooLarge(RuntimeError):
    """Both the catalog and the user count exceed EASE's limit: no exact inverse is affordable."""


def _inverse(gram: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite float64 matrix (overwrites `gram`)."""
    return scipy.linalg.inv(gram.T, overwrite_a=True, check_finite=False)  # gram.T: Fortran order, same matrix


class EASE(Scorer):
    """Closed-form EASE with L2 weight `l2` (λ); `path` "auto" | "dense" | "woodbury"."""

    name = "ease"

    def __init__(self, l2: float = 500.0, path: str = "auto", max_dim: int = MAX_DIM):
        if path not in ("auto", "dense", "woodbury"):
            raise ValueError(f"EASE path must be auto, dense or woodbury, not {path!r}")
        super().__init__(l2=l2)
        self.path, self.max_dim = path, max_dim

    @classmethod
    def grid(cls) -> list[dict]:
        return [{"l2": v} for v in (10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 20000.0)]

    def fit(self, train: Interactions, validation: Queries | None = None) -> None:
        n_users, n_items = train.n_users, train.n_items
        if min(n_users, n_items) > self.max_dim:
            raise EASETooLarge(f"{n_items} items and {n_users} users both exceed {self.max_dim}: an exact "
                               f"{min(n_users, n_items)}² float64 inverse is too large")
        self.n_items, self.l2 = n_items, float(self.params["l2"])
        x = train.matrix().astype(np.float64)
        self.route = self.path if self.path != "auto" else ("dense" if n_items <= n_users else "woodbury")
        if self.route == "dense":
            self._fit_dense(x)
        else:
            self._fit_woodbury(x)

    def _fit_dense(self, x: sparse.csr_matrix) -> None:
        gram = (x.T @ x).toarray()
        gram[np.diag_indices_from(gram)] += self.l2
        p = _inverse(gram)
        b = p / -np.diag(p)[None, :]
        b[np.diag_indices_from(b)] = 0.0
        self._b = b.astype(np.float32)

    def _fit_woodbury(self, x: sparse.csr_matrix) -> None:
        kernel = (x @ x.T).toarray()
        kernel[np.diag_indices_from(kernel)] += self.l2
        self._x, self._m = x, _inverse(kernel)
        xc = x.tocsc()
        colsum = np.empty(self.n_items)
        step = max(1, BLOCK_ELEMENTS // max(x.shape[0], 1))
        for a in range(0, self.n_items, step):
            xb = xc[:, a:a + step].T.tocsr()  # [block, users]
            colsum[a:a + step] = np.asarray(xb.multiply(xb @ self._m).sum(axis=1)).ravel()  # (XᵀMX)_jj
        self._diag_p = (1.0 - colsum) / self.l2

    def scores64(self, h: sparse.csr_matrix) -> np.ndarray:
        """float64 h·B for a multi-hot batch h [b, n_items]."""
        if self.route == "dense":
            return np.asarray(h @ self._b, np.float64)
        hd = h.toarray().astype(np.float64)
        hxm = np.asarray((h.astype(np.float64) @ self._x.T).toarray()) @ self._m  # (hXᵀ)M [b, users]
        hp = (hd - np.asarray((self._x.T @ hxm.T).T)) / self.l2
        return hd - hp / self._diag_p[None, :]

    def score(self, queries: Queries, start: int, stop: int) -> np.ndarray:
        return self.scores64(history_multi_hot(queries, start, stop, self.n_items)).astype(np.float32)
