"""Run the embedded model server as a child process, bound to loopback, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServerProcess:
    """`python -m serving.server` in a child process; it also stops itself after `lifetime` s."""

    def __init__(self, model_base: Path | None = None, lifetime: float = 900.0, startup_timeout: float = 120.0,
                 log_path: Path | None = None, model_config_file: Path | None = None,
                 extra_args: list[str] | tuple[str, ...] = ()):
        self._dir = tempfile.TemporaryDirectory(prefix="adrec-server-")
        port_file = Path(self._dir.name) / "port"
        self.log_path = log_path or Path(self._dir.name) / "server.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "serving.server", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--lifetime", str(lifetime), *extra_args]
        if model_base is not None:
            cmd += ["--model-base", str(model_base)]
        if model_config_file is not None:
            cmd += ["--model-config-file", str(model_config_file)]
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        deadline = time.monotonic() + startup_timeout
        while not port_file.exists():
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(f"model server exited with code {self.process.returncode}:\n"
                                   + self.log_path.read_text()[-2000:])
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"model server did not start within {startup_timeout:.0f}s")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout)
        if not self._log.closed:
            self._log.close()
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
