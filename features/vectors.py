"""Creative vectors (an image or video embedding per ad, from any model): parsed and checked.

A catalog column holds one vector per row: a list or array (a Parquet list column) or text of numbers
("0.1 0.2 0.3", "[0.1, 0.2, 0.3]"; a CSV cell). An .npz file holds `ad_id` [n] and `vectors` [n, dim];
its shapes and dtypes are read from the archive's headers first, so a file of the wrong width, or one
larger than the spec's `max_bytes`, is refused before its data is read. Row-level problems (a wrong
length, a value that is not a finite number, an ad with no vector) are the data policy's `bad_vector`
and `missing_vector`; a malformed file fails the run.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.spec import VECTOR_FILE_KEYS, AdVectorSpec

_SEPARATORS = re.compile(r"[\s,;]+")


class VectorFileError(ValueError):
    """An ad vector file cannot be used at all: missing, unreadable, wrong arrays or shapes, too large."""


def _one_vector(value, dim: int) -> tuple[np.ndarray | None, str]:
    """-> (the vector as float32, "") or (None, what is wrong)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, "no vector"
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]").strip()
        parts = [p for p in _SEPARATORS.split(text) if p]
        try:
            values = np.array([float(p) for p in parts], np.float64)
        except ValueError:
            return None, "text that is not a list of numbers"
    else:
        try:
            values = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            return None, f"a {type(value).__name__}, not a list of numbers"
    if values.ndim != 1:
        return None, f"an array of shape {list(values.shape)}"
    if len(values) != dim:
        return None, f"{len(values)} numbers"
    if not np.isfinite(values).all():
        return None, "NaN or inf at index " + str(int(np.flatnonzero(~np.isfinite(values))[0]))
    if np.abs(values).max(initial=0.0) > np.finfo(np.float32).max:
        return None, "a number beyond float32"
    return values.astype(np.float32), ""


def parse_vectors(series: pd.Series, dim: int) -> tuple[pd.Series, pd.Series, pd.Series]:
    """-> (vectors: float32 arrays, None where bad; is_bad; what is wrong, per row)."""
    parsed = [_one_vector(v, dim) for v in series]
    vectors = pd.Series([p[0] for p in parsed], index=series.index, dtype=object)
    why = pd.Series([p[1] for p in parsed], index=series.index, dtype=object)
    return vectors, why != "", why


@dataclass
class VectorFile:
    """An .npz of ad vectors: `rows` maps ad id -> row of `vectors`; `finite` says which rows are usable."""

    path: str
    rows: dict[str, int]
    vectors: np.ndarray
    finite: np.ndarray

    def lookup(self, ad_ids: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
        """-> (vectors, None where missing or bad; is_missing; is_bad (NaN/inf), with the file's row named)."""
        row = ad_ids.map(self.rows)
        missing = row.isna()
        index = row.fillna(-1).astype(np.int64).to_numpy()
        bad = pd.Series(~missing.to_numpy() & ~self.finite[np.maximum(index, 0)], index=ad_ids.index)
        vectors = pd.Series([self.vectors[i] if i >= 0 and self.finite[i] else None for i in index],
                            index=ad_ids.index, dtype=object)
        where = pd.Series([f"row {i} of {self.path}: NaN or inf" for i in index], index=ad_ids.index, dtype=object)
        return vectors, missing, where.where(bad, "")


def _array_headers(archive: zipfile.ZipFile, path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    headers = {}
    for key in VECTOR_FILE_KEYS:
        try:
            member = archive.open(f"{key}.npy")
        except KeyError:
            raise VectorFileError(f"{path}: no array {key!r}; expected arrays {list(VECTOR_FILE_KEYS)}, found "
                                  f"{[n.removesuffix('.npy') for n in archive.namelist()]}") from None
        with member:
            version = np.lib.format.read_magic(member)  # then the header only, no data
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise VectorFileError(f"{path}: array {key!r} is in .npy format {version}; expected 1.0 or 2.0")
        headers[key] = (shape, dtype)
    return headers


def read_vector_file(spec: AdVectorSpec, root: Path) -> VectorFile:
    """The spec's .npz, its shapes and size checked from the headers before any vector is read."""
    path = Path(spec.file).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise VectorFileError(f"columns.ad_vector.file: no file {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            headers = _array_headers(archive, path)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        if isinstance(err, VectorFileError):
            raise
        raise VectorFileError(f"{path}: not a readable .npz archive ({err})") from None
    (id_shape, id_dtype), (shape, dtype) = headers["ad_id"], headers["vectors"]
    if len(shape) != 2 or shape[1] != spec.dim:
        raise VectorFileError(f"{path}: 'vectors' has shape {list(shape)}; expected [ads, {spec.dim}] "
                              "(columns.ad_vector.dim)")
    if id_shape != (shape[0],):
        raise VectorFileError(f"{path}: 'ad_id' has shape {list(id_shape)}; expected [{shape[0]}], one id per vector")
    if dtype.kind not in "fiu":
        raise VectorFileError(f"{path}: 'vectors' holds {dtype}; expected numbers")
    if id_dtype.kind not in "USiu":
        raise VectorFileError(f"{path}: 'ad_id' holds {id_dtype}; expected strings or integers (no pickled objects)")
    size = shape[0] * shape[1] * max(dtype.itemsize, 4)
    if size > spec.max_bytes:
        raise VectorFileError(f"{path}: {shape[0]:,d} vectors of {shape[1]} take {size:,d} bytes, more than "
                              f"columns.ad_vector.max_bytes {spec.max_bytes:,d}")
    with np.load(path, allow_pickle=False) as data:
        ids, vectors = data["ad_id"], data["vectors"]
    ids = [str(i).strip() for i in ids.tolist()]
    rows: dict[str, int] = {}
    for i, ad in enumerate(ids):
        if ad in rows:
            raise VectorFileError(f"{path}: ad id {ad!r} has two vectors (rows {rows[ad]} and {i})")
        rows[ad] = i
    with np.errstate(over="ignore"):
        vectors = vectors.astype(np.float32)
    return VectorFile(str(path), rows, vectors, np.isfinite(vectors).all(axis=1))
