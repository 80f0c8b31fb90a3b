"""A request's rows run through the model in slices of at most `max_rows_per_run` rows.

A model run keeps the cores it was given until it ends: one run over a thousand rows holds both
cores of a small machine for hundreds of milliseconds, and every other call's ops queue behind its
large ones. Run in slices, a large request's ops stay small, other calls' ops interleave with
them, and the call's deadline is checked before each slice and bounds the slice's run
(`RunOptions.timeout_in_ms`), so work stops soon after the caller gave up.

Only signatures whose every input and output is batch-major (a known rank >= 1 with an open first
dimension) are sliced: their rows are independent, as the adrec models' are (a request's answer
does not depend on the rest of its batch), so slicing changes no value; any other runs whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from serving.servable import Servable


class DeadlinePassed(RuntimeError):
    """The call's deadline passed between two slices; the rest was not run."""


def _batch_major(infos) -> bool:
    return all(info.shape is not None and len(info.shape) >= 1 and info.shape[0] is None for info in infos)


def run_sliced(servable: Servable, inputs: dict[str, np.ndarray], signature_name: str,
               output_filter: tuple[str, ...], max_rows: int,
               time_remaining: Callable[[], float | None]) -> dict[str, np.ndarray]:
    """`servable.run` in slices of `max_rows` rows, concatenated; `time_remaining()`: seconds left
    to the call (None: no deadline), read before each slice."""
    in_infos, out_infos = servable.signature(signature_name)
    wanted = [out_infos[k] for k in output_filter or out_infos if k in out_infos]
    rows = {len(v) for v in inputs.values() if np.ndim(v)}
    batch = rows.pop() if len(rows) == 1 else 0
    if batch <= max_rows or not (_batch_major(in_infos.values()) and _batch_major(wanted)):
        return servable.run(inputs, signature_name, output_filter, timeout_s=time_remaining())
    parts = []
    for start in range(0, batch, max_rows):
        left = time_remaining()
        if left is not None and left <= 0:
            raise DeadlinePassed(f"the request's deadline passed after {start} of its {batch} rows")
        rows_slice = {k: v[start:start + max_rows] for k, v in inputs.items()}
        parts.append(servable.run(rows_slice, signature_name, output_filter, timeout_s=left))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
