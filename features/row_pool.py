"""Rows of several files mixed and batched in numpy, so tf.data handles one element per batch.

A tf.data pipeline that unbatches streamed chunks into single rows and shuffles them pays its
per-element cost once per row and per feature column; that, not reading or validation, bounded the
streamed epoch (benchmarks/streaming.py). Here the same three steps run on column arrays:
`interleave` takes slices from `cycle_length` open files in turn, `RowPool` mixes rows in a bounded
pool, and `batches` cuts the pool into batches, each handed to tf.data whole.

Columns are a dict of equal-length 1-D numpy arrays (`features.dataset.frame_to_tensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

Columns = dict[str, np.ndarray]


def _length(columns: Columns) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def _take(columns: Columns, index) -> Columns:
    return {name: values[index] for name, values in columns.items()}


def _concat(parts: list[Columns]) -> Columns:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def interleave(open_file: Callable[[object], Iterable[Columns]], files: Iterable, cycle_length: int,
               slice_rows: int) -> Iterator[Columns]:
    """Slices of at most `slice_rows` rows, taken in turn from `cycle_length` files read at a time;
    a file that ends is replaced by the next one, so every row of every file comes out once."""
    if cycle_length < 1 or slice_rows < 1:
        raise ValueError(f"cycle_length ({cycle_length}) and slice_rows ({slice_rows}) must be >= 1")
    pending = iter(files)
    open_: list[tuple[Iterator[Columns], list]] = []  # (the file's chunks, [its current chunk, offset])

    def refill() -> None:
        while len(open_) < cycle_length:
            path = next(pending, None)
            if path is None:
                return
            open_.append((iter(open_file(path)), [None, 0]))

    refill()
    turn = 0
    while open_:
        turn %= len(open_)
        chunks, current = open_[turn]
        while current[0] is None or current[1] >= _length(current[0]):
            current[0], current[1] = next(chunks, None), 0
            if current[0] is None:
                break
        if current[0] is None:
            open_.pop(turn)
            refill()
            continue
        start = current[1]
        current[1] = min(start + slice_rows, _length(current[0]))
        yield _take(current[0], slice(start, current[1]))
        turn += 1


class RowPool:
    """At most `capacity` rows (plus the slice being added) held to mix; rows leave in random order.

    Each time the pool is full it is permuted and its older half, in that order, is released; so a
    row leaves at a random point among the next ~`capacity` rows that arrive, as in a shuffle buffer
    of that size, at one permutation per `capacity / 2` rows instead of a random draw per row."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        if capacity < 2:
            raise ValueError(f"a pool mixes at least 2 rows, not {capacity}")
        self.capacity, self.rng = capacity, rng
        self.parts: list[Columns] = []
        self.rows = 0

    def add(self, columns: Columns) -> Columns | None:
        """Add rows; returns the rows released (None while the pool is filling)."""
        self.parts.append(columns)
        self.rows += _length(columns)
        if self.rows < self.capacity:
            return None
        return self._release(self.rows - self.capacity // 2)

    def drain(self) -> Columns | None:
        """Every row left, mixed (at the end of the input)."""
        return self._release(self.rows) if self.rows else None

    def _release(self, count: int) -> Columns:
        pool = _take(_concat(self.parts), self.rng.permutation(self.rows))
        kept = _take(pool, slice(count, None))
        self.parts, self.rows = ([kept] if _length(kept) else []), self.rows - count
        return _take(pool, slice(0, count))


def batches(slices: Iterable[Columns], batch_size: int, pool_rows: int, rng: np.random.Generator,
            ) -> Iterator[Columns]:
    """Batches of `batch_size` rows (the last one smaller) from `slices`, mixed in a pool of
    `pool_rows` rows (0: in arrival order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    pool = RowPool(pool_rows, rng) if pool_rows >= 2 else None
    carry: list[Columns] = []
    carried = 0

    def cut(rows: Columns | None, last: bool) -> Iterator[Columns]:
        nonlocal carry, carried
        if rows is not None and _length(rows):
            carry.append(rows)
            carried += _length(rows)
        if carried < batch_size and not (last and carried):
            return
        joined = _concat(carry)
        full = carried - carried % batch_size
        for start in range(0, full, batch_size):
            yield _take(joined, slice(start, start + batch_size))
        rest = _take(joined, slice(full, None))
        carry, carried = ([rest] if _length(rest) else []), carried - full
        if last and carried:
            yield _concat(carry)
            carry, carried = [], 0

    for part in slices:
        yield from cut(pool.add(part) if pool is not None else part, last=False)
    yield from cut(pool.drain() if pool is not None else None, last=True)
