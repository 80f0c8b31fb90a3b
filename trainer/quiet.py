"""Quiet defaults for command-line runs: TensorFlow's own C++ log lines stay off the terminal.

`adrec` (and `python -m trainer.task`, and the benchmarks) call `quiet_tensorflow()` before anything
imports TensorFlow. It

- defaults `TF_CPP_MIN_LOG_LEVEL` to 3: TensorFlow's C++ INFO, WARNING and ERROR lines are not
  printed (e.g. "failed call to cuInit" on every run of a machine without a GPU). Failures that
  matter reach Python as exceptions, and the training job logs which GPUs TensorFlow sees;
- drops three lines TensorFlow writes while `import tensorflow` loads its libraries, before any log
  level applies: "Could not find cuda drivers on your machine, GPU will not be used.", absl's
  "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", and the
  INFO line "oneDNN custom operations are on ..." (CPUs where TensorFlow turns them on by default).
  Anything else written during the import is passed through unchanged.

Nothing here hides or changes devices (CUDA_VISIBLE_DEVICES is left alone). The user's setting wins:
`TF_CPP_MIN_LOG_LEVEL=0 adrec train ...` shows every TensorFlow log line again, the import's included.

Importing this module imports nothing heavy (`adrec --help` must not load TensorFlow).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile

QUIET_TF_LOG_LEVEL = "3"

# Written to fd 2 by C++ code while the TensorFlow libraries load, before any log level applies: "no GPU
# driver here", "a log line came before absl was set up" (every CPU-only run), and the INFO line saying
# oneDNN's kernels are on (on CPUs where TensorFlow enables them by default).
IMPORT_NOISE = (
    re.compile(rb"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\."),
    re.compile(rb"^I\d{4} .*port\.cc:\d+\] oneDNN custom operations are on\."),
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
)


def tf_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def quiet_environment() -> None:
    """The quiet defaults as environment variables, each only where the user has not set it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)


@contextlib.contextmanager
def native_stderr_filtered(patterns=IMPORT_NOISE):
    """Inside, what anything (C++ included) writes to file descriptor 2 is held in a temporary file;
    at the end the lines matching none of `patterns` are written to stderr, in order.

    For short stretches only (an import): the held lines appear when it ends, and a crash inside
    (a segfault, not an exception) would lose them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no file descriptor 2 to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()  # Python's own writes during the stretch belong in `held`, in order
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True)
                            if not any(p.search(line) for p in patterns))
            while kept:
                kept = kept[os.write(2, kept):]


def quiet_import(module: str):
    """Quiet defaults, then `importlib.import_module(module)` without TensorFlow's load-time noise,
    should the module load TensorFlow (see the module docstring). With `TF_CPP_MIN_LOG_LEVEL=0`
    (INFO shown) nothing is filtered."""
    quiet_environment()
    if module in sys.modules:
        return sys.modules[module]
    if tf_log_level() < 1:
        return importlib.import_module(module)
    with native_stderr_filtered():
        return importlib.import_module(module)


def quiet_tensorflow() -> None:
    """Quiet defaults, then `import tensorflow` without its load-time noise; a no-op once imported."""
    quiet_import("tensorflow")
