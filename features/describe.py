"""`adrec data describe`: what a validated data set holds, on one screen."""

from __future__ import annotations

import pandas as pd

from features.loader import LoadedData


def _time(ts: int) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M")


def describe(data: LoadedData) -> dict:
    """Counts, cardinalities, label rates and text lengths of a loaded data set."""
    s, logs, catalog = data.schema, data.logs, data.catalog
    out: dict = {
        "log_rows": int(len(logs)), "catalog_ads": int(len(catalog)),
        "users": int(logs["user_id"].nunique()), "ads_in_logs": int(logs["ad_id"].nunique()),
        "ads_never_logged": int((~catalog["ad_id"].isin(set(logs["ad_id"]))).sum()),
        "time_range": [_time(int(logs["timestamp"].min())), _time(int(logs["timestamp"].max()))],
        "label_rates": {c: float(logs[c].mean()) for c in ("click", "conversion") if c in logs},
        "cardinality": {c: int(frame[c].nunique()) for frame, cols in
                        ((logs, (*s.user_categoricals, *s.context_categoricals, *s.context_integers)),
                         (catalog, s.ad_categoricals)) for c in cols},
        "rows_per_user": _quantiles(logs.groupby("user_id").size()),
        "rows_per_ad": _quantiles(logs.groupby("ad_id").size()),
        "text_words": {c: _quantiles(catalog[c].str.split().str.len().fillna(0)) for c in s.ad_text},
    }
    if "rating" in logs:
        out["rating_mean"] = float(logs["rating"].mean())
    if "position" in logs:
        out["click_rate_by_position"] = {int(k): float(v) for k, v in
                                         logs.groupby("position")["click"].mean().head(10).items()}
    return out


def _quantiles(values: pd.Series) -> dict:
    q = values.quantile([0.5, 0.95])
    return {"mean": round(float(values.mean()), 2), "p50": float(q.iloc[0]), "p95": float(q.iloc[1]),
            "max": float(values.max())}


def format_description(d: dict) -> str:
    lines = [f"log rows {d['log_rows']:,d}, users {d['users']:,d}, catalog ads {d['catalog_ads']:,d} "
             f"({d['ads_in_logs']:,d} in logs, {d['ads_never_logged']:,d} never logged)",
             f"time {d['time_range'][0]} .. {d['time_range'][1]} UTC",
             "label rates: " + ", ".join(f"{k} {v:.4f}" for k, v in d["label_rates"].items())
             + (f"; mean rating {d['rating_mean']:.3f}" if "rating_mean" in d else "")]
    if d["cardinality"]:
        lines.append("cardinality: " + ", ".join(f"{k} {v:,d}" for k, v in d["cardinality"].items()))
    for key in ("rows_per_user", "rows_per_ad"):
        q = d[key]
        lines.append(f"{key.replace('_', ' ')}: mean {q['mean']}, p50 {q['p50']:g}, p95 {q['p95']:g}, "
                     f"max {q['max']:g}")
    for col, q in d["text_words"].items():
        lines.append(f"text {col!r} words: mean {q['mean']}, p50 {q['p50']:g}, p95 {q['p95']:g}, max {q['max']:g}")
    if "click_rate_by_position" in d:
        lines.append("click rate by position: " + ", ".join(
            f"{k}: {v:.4f}" for k, v in d["click_rate_by_position"].items()))
    return "\n".join(lines)
