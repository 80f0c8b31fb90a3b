"""tf.distribute strategy from the config.

MultiWorkerMirroredStrategy must exist before any TensorFlow op runs ("Collective ops must
be configured at program startup"), so the entry point creates the strategy first.

ParameterServerStrategy: the chief runs the job and schedules training steps on the workers; the
variables live on the parameter servers, each embedding table larger than `min_shard_bytes` split
into up to one shard per ps task. Worker and ps tasks only serve (`serve_cluster_task`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "parameter_server")
SERVING_TASKS = ("worker", "ps")  # the tasks of a parameter-server cluster that only serve


def make_strategy(name: str, tpu: str = "", ps_min_shard_bytes: int = 256 << 10):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' needs TF_CONFIG naming the cluster and this task")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        return parameter_server_strategy(ps_min_shard_bytes)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def _tf_config() -> dict:
    if "TF_CONFIG" not in os.environ:
        raise ValueError("strategy 'parameter_server' needs TF_CONFIG naming the cluster (chief, worker, ps) and "
                         "this task")
    try:
        return json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not JSON: {err}") from None


def cluster_task() -> tuple[str, int]:
    """This process's (task type, index) in TF_CONFIG, for strategy 'parameter_server'."""
    task = _tf_config().get("task") or {}
    return str(task.get("type", "")), int(task.get("index", 0))


def parameter_server_strategy(min_shard_bytes: int):
    """The chief's ParameterServerStrategy over TF_CONFIG's cluster: variables of at least
    `min_shard_bytes` are split into shards of at least that size, at most one per ps task."""
    config = _tf_config()
    cluster = config.get("cluster") or {}
    counts = {job: len(cluster.get(job) or ()) for job in ("chief", "worker", "ps")}
    if counts["chief"] != 1 or counts["worker"] < 1 or counts["ps"] < 1:
        raise ValueError(f"strategy 'parameter_server': TF_CONFIG's cluster needs one chief, at least one worker "
                         f"and at least one ps; it has {counts}")
    task_type, _ = cluster_task()
    if task_type != "chief":
        raise ValueError(f"strategy 'parameter_server': task {task_type!r} serves, it does not run the job "
                         "(trainer.task starts its server)")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=min_shard_bytes, max_shards=counts["ps"])
    return tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def serve_cluster_task() -> NoReturn:
    """A parameter-server cluster's worker or ps task (TF_CONFIG): start its gRPC server and serve the
    chief until killed."""
    task_type, index = cluster_task()
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = start_server(resolver.cluster_spec(), task_type, index, resolver.rpc_layer or "grpc")
    print(f"[adrec] parameter servers: {task_type} task {index} serving at "
          f"{resolver.cluster_spec().task_address(task_type, index)} until killed", file=sys.stderr, flush=True)
    server.join()
    raise RuntimeError("the cluster server stopped serving")


def start_server(cluster: tf.train.ClusterSpec, task_type: str, index: int, protocol: str = "grpc"):
    """Start the gRPC server of `cluster`'s worker or ps task `index` in this process (returns it).
    Workers run the steps the chief schedules, which may read text ops: registered first."""
    import tensorflow_text  # noqa: F401  (registers the TF Text ops a scheduled function may run)

    if task_type not in SERVING_TASKS:
        raise ValueError(f"task type {task_type!r} does not serve; expected one of {SERVING_TASKS}")
    config = tf.compat.v1.ConfigProto()
    if task_type == "worker":
        # One closure per coordinator at a time plus the worker's own work: with fewer inter-op threads
        # than workers + 1 the cluster can hang (TF's own in-process test clusters set the same).
        config.inter_op_parallelism_threads = max(os.cpu_count() or 1, cluster.num_tasks("worker") + 1)
    else:
        config.device_count["GPU"] = 0  # ps tasks hold variables only
    return tf.distribute.Server(cluster, job_name=task_type, task_index=index, protocol=protocol, config=config,
                                start=True)


def cluster_sizes() -> dict[str, int]:
    """Tasks per serving job (worker, ps) of TF_CONFIG's cluster."""
    cluster = _tf_config().get("cluster") or {}
    return {job: len(cluster.get(job) or ()) for job in SERVING_TASKS}


def is_parameter_server(strategy) -> bool:
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def is_chief(strategy) -> bool:
    """True on the one task that writes checkpoints and exports."""
    if is_parameter_server(strategy):
        return True  # only the chief runs the job; workers and ps tasks serve
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return task_type == "worker" and task_id == 0 and "chief" not in cluster
