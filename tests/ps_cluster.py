"""A parameter-server training job with its whole cluster in one process, on 127.0.0.1:
`python -m tests.ps_cluster [trainer.task arguments]`.

Starts 2 worker and 2 ps gRPC servers in-process (as TF's own tests do), points TF_CONFIG at them as
the chief, and runs `python -m trainer.task ... --strategy parameter_server`. A process of its own,
because an in-process TensorFlow server cannot be stopped: it ends with the process.
"""

import json
import os
import sys

from tests.processes import free_ports

WORKERS, PS = 2, 2


def main(argv: list[str]) -> int:
    from trainer.quiet import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    from trainer.strategy import start_server
    from trainer.task import main as task_main

    ports = iter(free_ports(1 + WORKERS + PS))
    cluster = {"chief": [f"127.0.0.1:{next(ports)}"],
               "worker": [f"127.0.0.1:{next(ports)}" for _ in range(WORKERS)],
               "ps": [f"127.0.0.1:{next(ports)}" for _ in range(PS)]}
    spec = tf.train.ClusterSpec(cluster)
    servers = [start_server(spec, job, i) for job, n in (("worker", WORKERS), ("ps", PS)) for i in range(n)]
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
    code = task_main([*argv, "--strategy", "parameter_server"])
    del servers  # they stop with the process
    return code


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # in-process servers would keep a normal exit waiting
