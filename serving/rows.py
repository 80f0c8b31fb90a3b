"""`recommend`'s requests as one Predict's inputs: rows of named values, checked against the signature.

A row is one request's features by name (a user dict and a context dict merged, or a DataFrame
row), with its `history` and `excluded_ad_ids` lists. Nothing is guessed: a name given twice, a
name the model does not take, ad ids it cannot use and values its dtypes cannot hold exactly
(`serving/values.py`) are refused with a `RequestError` before anything is sent.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from serving import values, wire
from serving.contract import AD_ID_LISTS, EXCLUDED_AD_IDS, HISTORY, USER_STATS
from serving.values import RequestError


def request_rows(requests, exclude: Sequence | None) -> list[dict]:
    """(user, context[, history]) tuples or a DataFrame as rows; `exclude`: one ad id list per row."""
    if hasattr(requests, "columns") and hasattr(requests, "to_dict"):  # a pandas DataFrame
        rows = requests.to_dict("records")
    else:
        rows = [_merged(r) for r in requests]
    if exclude is None:
        return rows
    if isinstance(exclude, str | bytes):
        raise RequestError(f"exclude must hold one list of ad ids per request, got {values.shown(exclude)}")
    if len(exclude) != len(rows):
        raise RequestError(f"exclude has {len(exclude)} lists for {len(rows)} requests")
    if any(EXCLUDED_AD_IDS in r for r in rows):
        raise RequestError(f"{EXCLUDED_AD_IDS!r} is given twice: in the requests and as exclude")
    return [{**r, EXCLUDED_AD_IDS: e} for r, e in zip(rows, exclude, strict=True)]


def check_names(rows: list[dict], specs: Mapping[str, str], model: str, ignore_unknown: bool) -> None:
    """Refuse what the model would not read: ad ids to a model without that input, and (unless
    `ignore_unknown`) feature names that are not its inputs, e.g. a misspelt `regoin`."""
    for name, why in ((HISTORY, " (it was exported with retrieval.history_length 0)"),
                      (EXCLUDED_AD_IDS, ": it cannot exclude ads (the recommender can)")):
        if name not in specs and any(values.ad_ids(r.get(name), name) for r in rows):
            raise RequestError(f"model {model!r} takes no {name!r}{why}")
    unknown = sorted({str(key) for r in rows for key in r} - {*specs, HISTORY, EXCLUDED_AD_IDS})
    if unknown and not ignore_unknown:
        raise RequestError(f"model {model!r} has no input(s) {unknown[:10]}; it takes {sorted(specs)} "
                           "(ignore_unknown_features=True drops the others)")


def predict_inputs(rows: list[dict], specs: Mapping[str, str],
                   shapes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """Each signature input as a [batch] (ad id lists: [batch, width]) array of its dtype."""
    batch = {}
    for name, dtype in specs.items():
        if name in AD_ID_LISTS:  # histories have the exported width; exclusions the longest list's
            width = None if name == EXCLUDED_AD_IDS else shapes.get(name, [-1, -1])[-1]
            batch[name] = values.padded_ad_ids([values.ad_ids(r.get(name), name) for r in rows], width)
            continue
        try:
            numpy_dtype = wire.numpy_dtype(dtype)
        except ValueError as err:
            raise RequestError(f"feature {name!r}: {err}") from None
        missing = [i for i, r in enumerate(rows) if name not in r or _is_missing(r[name])]
        if name in USER_STATS:  # unknown counters: a user with no earlier events, like an empty history
            batch[name] = values.column(name, [0 if i in missing else r[name] for i, r in enumerate(rows)],
                                        numpy_dtype)
            continue
        if missing:
            needed = sorted(set(specs) - {*AD_ID_LISTS, *USER_STATS})
            raise RequestError(f"feature {name!r} is missing (None or NaN in rows {missing[:5]}); "
                               f"the model needs {needed}")
        batch[name] = values.column(name, [r[name] for r in rows], numpy_dtype)
    return batch


def _merged(request) -> dict:
    """One row from a (user, context[, history]) tuple: a name given twice is refused, not overwritten."""
    parts = [_as_dict(request[0]), _as_dict(request[1])]
    if len(request) > 2 and request[2] is not None:
        parts.append({HISTORY: request[2]})
    row: dict = {}
    for part in parts:
        twice = sorted(map(str, row.keys() & part.keys()))
        if twice:
            raise RequestError(f"feature(s) {twice} given twice (user, context and history make one request)")
        row.update(part)
    return row


def _as_dict(values) -> dict:
    if hasattr(values, "to_dict") and not isinstance(values, Mapping):  # a pandas Series
        return values.to_dict()
    return dict(values or {})


def _is_missing(value) -> bool:
    if value is None:
        return True
    pd = sys.modules.get("pandas")  # values from a DataFrame may be pd.NA / NaT: pandas knows them
    if pd is not None:
        try:
            return bool(pd.isna(value))
        except (TypeError, ValueError):  # arrays and other non-scalars
            return False
    return isinstance(value, float | np.floating) and math.isnan(value)
