"""Normalisation statistics of numeric columns, fitted on training rows only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class NumericStats:
    """Per column mean and standard deviation (std 0 is stored as 1, so a constant maps to 0)."""

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        out = frame.copy()
        for col, mu in self.mean.items():
            out[col] = ((frame[col].astype("float64") - mu) / self.std[col]).astype("float32")
        return out

    def to_dict(self) -> dict:
        return {"mean": dict(self.mean), "std": dict(self.std)}


def fit_numeric_stats(train: pd.DataFrame, columns: tuple[str, ...]) -> NumericStats:
    """Fit on the training split; evaluation rows are only ever transformed with these numbers."""
    stats = NumericStats()
    for col in columns:
        values = train[col].astype("float64").to_numpy()
        std = float(np.std(values)) if len(values) else 0.0
        stats.mean[col] = float(np.mean(values)) if len(values) else 0.0
        stats.std[col] = std if std > 0 else 1.0
    return stats
