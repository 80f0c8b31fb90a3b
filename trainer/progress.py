"""What a running job tells its user: timestamped log lines and Keras progress verbosity.

Logs go to stderr; stdout is kept for results (`adrec train` prints only the metrics JSON there).
"""

from __future__ import annotations

import contextlib
import sys
import time


def log(msg: str, stream=None) -> None:
    """One timestamped line on `stream` (stderr by default: stdout carries results)."""
    print(f"[adrec {time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stderr, flush=True)


def fit_verbosity(progress: bool) -> int:
    """Keras progbar on a terminal, one line per epoch in logs (CI, files), nothing when quiet."""
    if not progress:
        return 0
    return 1 if sys.stderr.isatty() else 2


@contextlib.contextmanager
def stdout_to_stderr():
    """Inside, whatever writes to `sys.stdout` (Keras progress bars, a library's prints) writes to
    stderr: a job's chatter is logs, and stdout stays clean for its results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
