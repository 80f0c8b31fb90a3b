"""The feature schema: which column plays which role, and its dtype at the model boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.user_stats import USER_STATS


class SchemaError(ValueError):
    """A frame does not carry the columns or dtypes the schema asks for."""


@dataclass(frozen=True)
class FeatureSchema:
    """Column roles.

    String categoricals are looked up by value; integer categoricals (hour, weekday)
    are looked up as integers. Every id and categorical is passed raw to exported
    models: vocabularies live inside the graphs.
    """

    user_id: str = "user_id"
    ad_id: str = "ad_id"
    user_categoricals: tuple[str, ...] = ("age_bucket", "gender", "region")
    context_categoricals: tuple[str, ...] = ("device", "placement")
    context_integers: tuple[str, ...] = ("hour", "weekday")
    ad_categoricals: tuple[str, ...] = ("advertiser_id", "campaign_id", "category")
    ad_text: tuple[str, ...] = ("title", "description")
    bid: str = "bid"
    position: str = "position"
    timestamp: str = "timestamp"
    click: str = "click"
    conversion: str = "conversion"
    text_separator: str = " . "
    # A precomputed creative embedding per ad (an image or video vector from any model): the catalog
    # column holding one float vector of `ad_vector_dim` per ad ("" = the catalog has none).
    ad_vector: str = ""
    ad_vector_dim: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def query_string_features(self) -> tuple[str, ...]:
        return (self.user_id, *self.user_categoricals, *self.context_categoricals)

    @property
    def query_int_features(self) -> tuple[str, ...]:
        return tuple(self.context_integers)

    @property
    def query_features(self) -> tuple[str, ...]:
        return self.query_string_features + self.query_int_features

    @property
    def ad_string_features(self) -> tuple[str, ...]:
        return (self.ad_id, *self.ad_categoricals)

    @property
    def catalog_columns(self) -> tuple[str, ...]:
        return (*self.ad_string_features, *self.ad_text, self.bid)

    @property
    def log_columns(self) -> tuple[str, ...]:
        return (
            *self.query_features,
            self.ad_id,
            self.position,
            self.timestamp,
            self.click,
            self.conversion,
        )

    def is_int_feature(self, name: str) -> bool:
        return name in self.context_integers or name == self.position or name in USER_STATS

    def ad_text_of(self, catalog: pd.DataFrame) -> list[str]:
        """The one text string the encoder reads per ad: its text fields joined."""
        parts = [catalog[c].fillna("").astype(str) for c in self.ad_text]
        joined = parts[0]
        for p in parts[1:]:
            joined = joined + self.text_separator + p
        return joined.tolist()

    def ad_vectors_of(self, catalog: pd.DataFrame) -> np.ndarray | None:
        """[ads, ad_vector_dim] float32 in catalog order, or None when the schema has no ad vector."""
        if not self.ad_vector:
            return None
        self.require_columns(catalog, (self.ad_vector,), "ad vectors")
        if not len(catalog):
            return np.zeros((0, self.ad_vector_dim), np.float32)
        vectors = np.stack([np.asarray(v, np.float32) for v in catalog[self.ad_vector]])
        if vectors.shape[1] != self.ad_vector_dim or not np.isfinite(vectors).all():
            raise SchemaError(f"ad vectors: expected finite vectors of {self.ad_vector_dim} numbers in column "
                              f"{self.ad_vector!r}, got shape {list(vectors.shape)}"
                              + ("" if np.isfinite(vectors).all() else " with NaN or inf"))
        return vectors

    def require_columns(self, frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise SchemaError(
                f"{what}: missing column(s) {missing}; expected {list(columns)}, "
                f"found {list(frame.columns)}"
            )

    def model_dtype(self, name: str) -> np.dtype:
        if self.is_int_feature(name):
            return np.dtype("int64")
        if name in (self.click, self.conversion, self.bid):
            return np.dtype("float32")
        return np.dtype("object")


DEFAULT_SCHEMA = FeatureSchema()
