"""Jobs as separate processes on 127.0.0.1: free ports, one `trainer.task` process, a worker cluster."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (all bound at once, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def task(config: Path, *extra, env=None, **kwargs) -> subprocess.Popen:
    """`python -m trainer.task --config config --quiet *extra`, stdout and stderr together as text."""
    cmd = [sys.executable, "-m", "trainer.task", "--config", str(config), "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


def run_workers(config: Path, n: int, *extra, timeout: float = 420) -> list[str]:
    """n MultiWorkerMirrored workers of one job on 127.0.0.1; each must exit 0. Their outputs, by index."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(n)]}
    procs = [task(config, "--strategy", "multi_worker", *extra,
                  env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(n)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
    return outputs
