"""Training entry point: `python -m trainer.task --config configs/demo.yaml [--export]`.

The Vertex AI / AI Platform convention: the `trainer` package with a `task` module. The
distribution strategy is created before anything else touches TensorFlow, because
MultiWorkerMirroredStrategy must configure collectives at program start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import JobConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", help="job config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, the value read as YAML, e.g. retrieval.epochs=2 or "
                             "encoder.masked_lm.epochs=1 (repeatable; checked like the file)")
    parser.add_argument("--root", help="override data.root: the data directory of a data spec")
    parser.add_argument("--model-dir", help="override training.model_dir")
    parser.add_argument("--export-dir", help="override export.export_dir")
    parser.add_argument("--strategy", choices=["default", "mirrored", "multi_worker", "tpu", "parameter_server"],
                        help="override training.strategy")
    parser.add_argument("--warm-start", metavar="MODEL_DIR",
                        help="start from the last checkpoint of a finished job (same vocabularies)")
    parser.add_argument("--no-export", action="store_true", help="train and evaluate only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_config(args) -> JobConfig:
    """The config file, then `--set` overrides, then the dedicated flags (which win)."""
    from trainer.config import load_config  # here, not at the top: `adrec --help` imports this module

    cfg = load_config(args.config, args.set)
    if args.root:
        cfg.data.root = args.root
    if args.model_dir:
        cfg.training.model_dir = args.model_dir
    if args.export_dir:
        cfg.export.export_dir = args.export_dir
    if args.strategy:
        cfg.training.strategy = args.strategy
    return cfg


def train_and_export(cfg: JobConfig, export: bool = True, progress: bool = True, warm_start: str | None = None):
    """Train (and export) on this process; under strategy 'parameter_server' a worker or ps task
    (TF_CONFIG's task type) instead starts its server and serves the chief until killed."""
    from trainer.strategy import SERVING_TASKS, cluster_task, is_chief, make_strategy, serve_cluster_task

    if cfg.training.strategy == "parameter_server" and cluster_task()[0] in SERVING_TASKS:
        serve_cluster_task()  # does not return

    dp = cfg.privacy.dp.enabled
    if dp and export:
        raise ValueError("privacy.dp trains the retrieval model only, and an export serves the ranking model "
                         "too, which would learn from the same rows without noise: run with --no-export "
                         "(docs/training.md#differential-privacy)")
    strategy = make_strategy(cfg.training.strategy, cfg.training.tpu,  # first TF work of the process
                             cfg.training.ps_min_shard_bytes)
    from trainer.export import export_all
    from trainer.job import run_training
    from trainer.progress import log
    from trainer.resume import clear_stages

    log_devices()
    # The finished stages outlive training until the export is published: a job killed or failing while
    # it exports is rerun with the same config and only exports (docs/training.md#outputs-and-fault-tolerance).
    trained = run_training(cfg, strategy, progress=progress, warm_start=warm_start, keep_stages=export,
                           with_ranking=not dp)
    result = None
    if export:
        # Saving multi-worker variables runs collectives, so every worker exports; only the
        # chief's export is published, the others write to a temporary directory and delete it.
        if is_chief(strategy):
            result = export_all(trained, cfg.export.export_dir)
            log(f"exported version {result.version}: " + ", ".join(str(p) for p in result.paths.values()))
        else:
            with tempfile.TemporaryDirectory(prefix="adrec-worker-export-") as scratch:
                export_all(trained, scratch)
        clear_stages(Path(cfg.training.model_dir), strategy)
    return trained, result


def log_devices() -> None:
    """One line on what TensorFlow runs on: its own device lines are off by default (trainer/quiet.py)."""
    import tensorflow as tf

    from trainer.progress import log

    gpus = tf.config.list_physical_devices("GPU")
    log(f"TensorFlow {tf.__version__}: " + (f"{len(gpus)} GPU(s): {', '.join(g.name for g in gpus)}" if gpus
                                              else "no GPU visible, running on CPU"))


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """The metrics JSON to `path`, atomically: a temporary file beside it renamed into place, so a
    reader never sees half a file and a failed write leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(metrics, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def weights_digest(trained) -> str:
    """A hash of every trained weight: equal on all workers of a synchronous job."""
    import hashlib

    digest = hashlib.sha256()
    for model in (trained.retrieval, trained.ranking):
        for w in model.trainable_weights:
            digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv=None) -> int:
    from trainer.progress import set_progress, stdout_to_stderr
    from trainer.quiet import quiet_tensorflow

    parser = argparse.ArgumentParser(prog="python -m trainer.task", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--metrics-out", metavar="FILE", help="also write the metrics JSON to FILE (atomically)")
    args = parser.parse_args(argv)
    set_progress(not args.quiet)
    quiet_tensorflow()
    cfg = resolve_config(args)
    with stdout_to_stderr():  # stdout is for results
        trained, _ = train_and_export(cfg, export=not args.no_export, progress=not args.quiet,
                                      warm_start=args.warm_start)
    if args.metrics_out:
        write_metrics(args.metrics_out, trained.metrics)
    print(json.dumps(trained.metrics, indent=2))
    print(f"weights digest: {weights_digest(trained)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
