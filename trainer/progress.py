"""What a running job tells its user: timestamped log lines and Keras progress verbosity."""

from __future__ import annotations

import sys
import time


def log(msg: str, stream=None) -> None:
    """One timestamped line on `stream` (stdout by default; stderr where stdout carries results)."""
    print(f"[adrec {time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stdout, flush=True)


def fit_verbosity(progress: bool) -> int:
    """Keras progbar on a terminal, one line per epoch in logs (CI, files), nothing when quiet."""
    if not progress:
        return 0
    return 1 if sys.stdout.isatty() else 2
