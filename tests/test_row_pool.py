"""features.row_pool: every row exactly once, files interleaved, rows mixed within the pool's reach."""

import numpy as np
import pytest

from features.row_pool import RowPool, batches, interleave


def _file(name: str, rows: int, chunk: int):
    """A file's chunks: column `row` numbers the rows, `file` names the file."""
    def chunks():
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            yield {"row": np.arange(start, stop), "file": np.array([name] * (stop - start), dtype=object)}
    return chunks


FILES = {"a": _file("a", 10, 4), "b": _file("b", 7, 3), "c": _file("c", 5, 5)}


def _rows(parts) -> list[tuple[str, int]]:
    return [(f, int(r)) for p in parts for f, r in zip(p["file"], p["row"], strict=True)]


def test_interleave_takes_slices_in_turn_and_every_row_once():
    opened = []

    def open_file(name):
        opened.append(name)
        return FILES[name]()

    slices = list(interleave(open_file, ["a", "b", "c"], cycle_length=2, slice_rows=2))
    assert all(len(s["row"]) <= 2 for s in slices)
    rows = _rows(slices)
    assert sorted(rows) == sorted((n, r) for n, rows in (("a", 10), ("b", 7), ("c", 5)) for r in range(rows))
    assert [s["file"][0] for s in slices[:4]] == ["a", "b", "a", "b"]  # two files at a time, in turn
    assert opened == ["a", "b", "c"]  # the third opens only when one of the first two ends
    per_file = {}
    for name, row in rows:
        per_file.setdefault(name, []).append(row)
    assert all(v == sorted(v) for v in per_file.values())  # a file's own rows keep their order


def test_batches_without_a_pool_keep_arrival_order_and_sizes():
    slices = interleave(lambda n: FILES[n](), ["a", "b", "c"], 1, 3)
    out = list(batches(slices, 4, 0, np.random.default_rng(0)))
    assert [len(b["row"]) for b in out] == [4, 4, 4, 4, 4, 2]
    assert _rows(out) == [("a", r) for r in range(10)] + [("b", r) for r in range(7)] + [("c", r) for r in range(5)]


def test_pooled_batches_hold_every_row_once_mixed_within_reach():
    rows = 5000
    chunk = {"row": np.arange(rows), "file": np.array(["x"] * rows, dtype=object)}
    slices = (dict((k, v[s:s + 100]) for k, v in chunk.items()) for s in range(0, rows, 100))
    out = list(batches(slices, 64, 1000, np.random.default_rng(3)))
    got = np.concatenate([b["row"] for b in out])
    assert sorted(got.tolist()) == list(range(rows))
    assert [len(b["row"]) for b in out[:-1]] == [64] * (len(out) - 1)
    displacement = np.abs(got - np.arange(rows))
    assert displacement.mean() > 100  # mixed, not in arrival order
    # Within the pool's reach: a row stays through each release with probability 1/2 (as in a shuffle
    # buffer), so few move more than a few pools; a global shuffle would move half of them > rows / 3.
    assert np.quantile(displacement, 0.99) < 4 * 1000
    again = np.concatenate([b["row"] for b in batches(
        (dict((k, v[s:s + 100]) for k, v in chunk.items()) for s in range(0, rows, 100)), 64, 1000,
        np.random.default_rng(3))])
    assert (again == got).all()  # the same seed mixes the same way


def test_pool_and_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="at least 2 rows"):
        RowPool(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches([], 0, 10, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="cycle_length"):
        list(interleave(lambda n: FILES[n](), ["a"], 0, 2))
