"""What a running job tells its user: the `adrec` logger, progress of slow steps, Keras verbosity.

Everything here writes to stderr; stdout carries only a command's results (`adrec train` prints the
metrics JSON there, `adrec demo` the recommendations and metrics).

- `log(msg)`: one timestamped line through the `adrec` logger (`logging.getLogger("adrec")`; modules
  may log through children such as `adrec.serving`).
- `Progress`: a step that can take more than a few seconds (encoding a catalog, reading logs,
  evaluating, exporting). On a terminal it is one line redrawn in place and cleared at the end; in a
  log file or CI it writes a plain line every `every` seconds and nothing for a short step.
  `set_progress(False)` (`--quiet`) turns progress off; log lines stay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time

LOGGER_NAME = "adrec"
_CLEAR_LINE = "\r\x1b[K"

_lock = threading.RLock()
_live: Progress | None = None  # the progress line on the terminal, if one is drawn
_enabled = True


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives (a redirect, pytest's capture), and
    clears an in-place progress line first so a log line never lands in the middle of one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; the property always reads sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        with _lock:
            if _live is not None and _live.tty:
                sys.stderr.write(_CLEAR_LINE)
            super().emit(record)


class _Formatter(logging.Formatter):
    def __init__(self):
        super().__init__("[adrec %(asctime)s] %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:  # "[adrec 12:00:00] warning: ..."
            record.message = f"{record.levelname.lower()}: {record.message}"
        return super().formatMessage(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """The `adrec` logger (or its child `adrec.<name>`), writing to stderr at INFO.

    It does not propagate to the root logger: a root handler (`logging.basicConfig`) would print
    every line twice."""
    root = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root if name is None else root.getChild(name)


def log(msg: str, stream=None) -> None:
    """One timestamped line on stderr through the `adrec` logger (stdout carries results); with
    `stream`, the same line on that stream instead."""
    if stream is None or stream is sys.stderr:
        get_logger().info(msg)
    else:
        print(f"[adrec {time.strftime('%H:%M:%S')}] {msg}", file=stream, flush=True)


def set_progress(enabled: bool) -> bool:
    """Turn progress lines on or off for this process (`--quiet` turns them off); logs are unaffected.
    Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


class Progress:
    """Progress of one slow step: `with Progress("encoding ad texts", total=n, unit="texts") as p:
    ... p.advance(k)`; or `p = Progress(...).start()` ... `p.close()`.

    A terminal shows "[adrec 12:00:00] encoding ad texts 512/2,000 texts 4s", redrawn every second
    and on each `advance`, cleared at the end. Elsewhere (a file, CI) a step shorter than `every`
    seconds writes nothing; a longer one writes a plain line every `every` seconds. `done`, when
    given, is logged at the end with the elapsed time. `total=None`: a step that is not counted.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "", every: float = 30.0,
                 enabled: bool = True, done: str | None = None):
        self.what, self.total, self.unit, self.every, self.done = what, total, unit, float(every), done
        self.enabled = bool(enabled) and _enabled
        self.tty = self.enabled and _stderr_is_tty()
        self.count = 0
        self.note = ""
        self.started = time.monotonic()
        self._clock = time.strftime("%H:%M:%S")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: Progress | None = None
        self._last_draw = 0.0

    def start(self) -> Progress:
        global _live
        self.started = time.monotonic()
        self._clock = time.strftime("%H:%M:%S")
        if not self.enabled:
            return self
        with _lock:
            self._previous, _live = _live, self
        self._thread = threading.Thread(target=self._tick, name=f"adrec-progress-{self.what}", daemon=True)
        self._thread.start()
        if self.tty:
            self._draw()
        return self

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.count += n
        if note is not None:
            self.note = note
        if self.tty and time.monotonic() - self._last_draw >= 0.1:
            self._draw()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def describe(self) -> str:
        """E.g. "encoding ad texts 512/2,000 texts (retrieval)"."""
        parts = [self.what]
        if self.total is not None:
            parts.append(f"{self.count:,d}/{self.total:,d}")
        elif self.count:
            parts.append(f"{self.count:,d}")
        if self.unit and (self.total is not None or self.count):
            parts.append(self.unit)
        if self.note:
            parts.append(f"({self.note})")
        return " ".join(parts)

    def _draw(self) -> None:
        with _lock:
            if _live is not self:
                return
            self._last_draw = time.monotonic()
            sys.stderr.write(f"{_CLEAR_LINE}[adrec {self._clock}] {self.describe()} {self.elapsed():.0f}s")
            sys.stderr.flush()

    def _tick(self) -> None:
        period = 1.0 if self.tty else self.every
        while not self._stop.wait(period):
            if self.tty:
                self._draw()
            else:
                log(f"{self.describe()}: {self.elapsed():.0f}s so far")

    def close(self) -> None:
        global _live
        if self.enabled:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            with _lock:
                if self.tty and _live is self:
                    sys.stderr.write(_CLEAR_LINE)
                    sys.stderr.flush()
                if _live is self:
                    _live = self._previous
        if self.done is not None:
            log(f"{self.done} in {self.elapsed():.1f}s")

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def step(what: str, every: float = 30.0):
    """A decorator: the function is an uncounted `Progress` step (its caller logs its results)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with Progress(what, every=every):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def fit_verbosity(progress: bool) -> int:
    """Keras progbar on a terminal, one line per epoch in logs (CI, files), nothing when quiet."""
    if not (progress and _enabled):
        return 0
    return 1 if _stderr_is_tty() else 2


@contextlib.contextmanager
def stdout_to_stderr():
    """Inside, whatever writes to `sys.stdout` (Keras progress bars, a library's prints) writes to
    stderr: a job's chatter is logs, and stdout stays clean for its results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
