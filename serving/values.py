"""A caller's request values as a signature's dtypes, refusing every conversion that would change them.

The client's one place for turning Python, numpy or pandas values (and `adrec recommend`'s
`--feature` text) into what a model declares:

- string inputs take `str`, UTF-8 `bytes` or an integer (sent as its decimal digits); undecodable
  bytes, floats (`7.0` would be a guess at "7") and bools are refused;
- integer inputs take integers and whole floats in the dtype's range, and text written as an
  integer (`"007"` -> 7); a fraction (7.5), inf / nan, 2**63 for int64, text such as "7.5" or "x"
  and bools are refused, never truncated or wrapped;
- float inputs take integers, finite floats within the dtype's range (1e300 overflows float32) and
  text written as a decimal number;
- a list of ad ids is a list (or tuple, array, ...) of ids; a bare string is refused, not read as
  a list of characters.

Every refusal is a `RequestError` (a `ValueError`) whose one-line message names the input and
shows the value, cut to a readable length. Imports numpy only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TypeGuard

import numpy as np

from serving.contract import PAD_AD_ID

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_SHOWN = 60  # characters of a refused value shown in a message


class RequestError(ValueError):
    """A request cannot be built from the given values (missing, unknown or ill-typed inputs)."""


def shown(value: object) -> str:
    """`repr(value)` cut to a readable length: a 1 MB id makes a one-line message, not a dump."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


def _is_integer(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def text(value: object) -> bytes:
    """A string input's value as UTF-8 bytes."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate
            raise ValueError(f"{shown(value)} cannot be encoded as UTF-8 ({err.reason})") from None
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"bytes {shown(value)} are not UTF-8 ({err.reason} at {err.start})") from None
        return bytes(value)
    if _is_integer(value):
        return str(int(value)).encode("ascii")
    raise ValueError(f"expected text, got {type(value).__name__} {shown(value)}")


def _parsed(value: str | bytes, dtype: np.dtype) -> int | float:
    """Text written as a number: an integer for integer dtypes, a decimal number for floats."""
    raw = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    if _INTEGER.fullmatch(raw):
        return int(raw)
    if dtype.kind == "f" and _DECIMAL.fullmatch(raw):
        return float(raw)
    expected = "an integer" if dtype.kind in "iu" else "a decimal number"
    raise ValueError(f"expected {expected}, got {shown(value)}")


def number(value: object, dtype: np.dtype) -> int | float | bool:
    """One value of a numeric (or bool) input, exactly as given or refused."""
    if dtype.kind == "b":
        if isinstance(value, bool | np.bool_):
            return bool(value)
        raise ValueError(f"expected a bool, got {type(value).__name__} {shown(value)}")
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"expected a number, got the bool {value!r}")
    parsed = _parsed(value, dtype) if isinstance(value, str | bytes) else value
    if _is_integer(parsed):
        exact: int | float = int(parsed)
    elif isinstance(parsed, float | np.floating):
        exact = float(parsed)
    else:
        raise ValueError(f"expected a number, got {type(value).__name__} {shown(value)}")
    if dtype.kind == "f":
        try:
            as_float = float(exact)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float) or abs(as_float) > float(np.finfo(dtype).max):
            raise ValueError(f"{shown(value)} is not a finite {dtype} number")
        return as_float
    if isinstance(exact, float):
        if not math.isfinite(exact):
            raise ValueError(f"{shown(value)} is not a finite number")
        if not exact.is_integer():
            raise ValueError(f"{shown(value)} is not a whole number (it is never truncated)")
        exact = int(exact)
    info = np.iinfo(dtype)
    if not info.min <= exact <= info.max:
        raise ValueError(f"{shown(value)} is outside the range of {dtype}")
    return exact


def column(name: str, items: list, dtype: np.dtype) -> np.ndarray:
    """A batch's values of input `name` as a [batch] array of `dtype` (object: UTF-8 text)."""
    out = []
    for row, value in enumerate(items):
        try:
            out.append(text(value) if dtype.kind == "O" else number(value, dtype))
        except ValueError as err:
            declared = "string" if dtype.kind == "O" else str(dtype)
            where = f" (row {row})" if len(items) > 1 else ""
            raise RequestError(f"feature {name!r} must be {declared}: {err}{where}") from None
    return np.array(out, dtype=dtype)


def ad_ids(value: object, name: str) -> list[str]:
    """One request's list of ad ids (`history`, `excluded_ad_ids`): None or NaN means none, None and
    "" entries are padding; ids are text as `text` takes it."""
    if value is None or isinstance(value, float | np.floating) and math.isnan(value):
        return []
    if isinstance(value, str | bytes):
        raise RequestError(f"{name!r} must be a list of ad ids, got the single string {shown(value)} "
                         "(a list of one id: [id])")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise RequestError(f"{name!r} must be a list of ad ids, got {type(value).__name__} {shown(value)}")
    ids = []
    for entry in value:
        if entry is None:
            continue
        try:
            ids.append(text(entry).decode("utf-8"))
        except ValueError as err:
            raise RequestError(f"{name!r}: {err}") from None
    return [i for i in ids if i != PAD_AD_ID]


def padded_ad_ids(lists: list[list[str]], width: int | None = None) -> np.ndarray:
    """[batch, width] UTF-8 ad ids padded with PAD_AD_ID and cut to `width` (the first entries kept);
    without a width, the longest list's (at least 1)."""
    if width is None or width < 0:
        width = max([1, *(len(v) for v in lists)])
    out = np.full((len(lists), width), PAD_AD_ID.encode(), dtype=object)
    for i, values in enumerate(lists):
        values = values[:width]
        out[i, :len(values)] = [v.encode("utf-8") for v in values]
    return out
