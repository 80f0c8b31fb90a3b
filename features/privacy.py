"""Pseudonymisation of loaded frames: the columns that identify people, replaced by keyed pseudonyms.

Applied once, where a job's loaded catalog and logs enter it (`trainer.prepare.load_job_data`),
so splits, histories, vocabularies, models, checkpoints and exports only ever see pseudonyms.
The hash itself is `serving.pseudonym` (standard library only: the thin client applies it too).
"""

from __future__ import annotations

import pandas as pd

from serving.pseudonym import pseudonyms


def pseudonymize_columns(frame: pd.DataFrame, columns: tuple[str, ...], key: bytes) -> pd.DataFrame:
    """A copy of `frame` with each of `columns` it holds mapped to pseudonyms (string columns: ids and
    categoricals; "" stays "", the value "not known")."""
    present = [c for c in columns if c in frame.columns]
    if not present:
        return frame
    out = frame.copy()
    for col in present:
        text = out[col].astype(str)
        out[col] = text.map(pseudonyms(text.unique(), key)).astype(object)
    return out
