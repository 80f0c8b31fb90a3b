"""One epoch over a sharded synthetic Parquet log through the streaming path, next to today's in-memory path.

Writes `--rows` impressions (default 20,000,000) as `--files` Parquet files, `--piece-rows` at a time so
writing does not raise the peak, with a small synthetic catalog; then trains one epoch of retrieval and
ranking through `data.stream` (validation + vocabulary pass, then the two stages) in a child process,
and the in-memory path (`data.source: spec`, the log read into pandas) in another child on the first
`--in-memory-rows` rows only: the in-memory path cannot hold 20M rows in the RSS budget, so its rows/s
is measured on a subsample that fits, and said so in the output. Each child reports its own peak RSS
(ru_maxrss); the budget applies to the streaming child.

    .venv/bin/python benchmarks/streaming.py [--rows 20000000] [--out runs/bench/streaming.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS_BUDGET_MB = 3072
OVERRIDES = {  # what the streaming path supports, set the same for both paths
    "retrieval": {"history_length": 0, "epochs": 1, "batch_size": 1024},
    "ranking": {"validation_fraction": 0.0, "epochs": 1, "batch_size": 4096},
    "evaluation": {"baselines": []},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def write_inputs(root: Path, rows: int, files: int, piece_rows: int, n_users: int, seed: int = 0) -> Path:
    from features.synthetic import SyntheticConfig, generate_world
    from features.synthetic_files import random_log_piece, write_catalog, write_log_files

    world = generate_world(SyntheticConfig(n_users=200, n_advertisers=50, n_ads=1000, n_impressions=1000))
    spec = write_catalog(world.catalog, root)
    rng = np.random.default_rng(seed)
    pieces = (random_log_piece(rng, min(piece_rows, rows - start), world.catalog, n_users,
                               1_767_225_600 + 86_400 * (start // piece_rows))
              for start in range(0, rows, piece_rows))
    write_log_files(pieces, root, files)
    return spec


def _config(spec: Path, work: Path, stream: bool, hash_users: int, shuffle_buffer: int) -> dict:
    from trainer.config import config_to_dict, load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.training.model_dir = str(work / "run")
    cfg.export.export_dir = str(work / "models")
    raw = config_to_dict(cfg)
    for section, values in OVERRIDES.items():
        raw[section].update(values)
    raw["data"].update({"source": "spec", "spec": str(spec)})
    raw["data"]["stream"] = {"enabled": stream, "hash_buckets": {"user_id": hash_users} if hash_users else {},
                             "shuffle_buffer": shuffle_buffer}
    return raw


def child(config: Path) -> int:
    """Train the config's job (no export); one JSON line of its numbers on stdout."""
    from trainer.config import load_config
    from trainer.job import run_training

    cfg = load_config(config)
    t0 = time.perf_counter()
    trained = run_training(cfg, progress=True, with_ranking=True)
    seconds = time.perf_counter() - t0
    m = trained.metrics
    rows = m["stream"]["rows"] if "stream" in m else len(trained.split.train)
    epoch = m["train_epoch_seconds"]["ranking"]
    print(json.dumps({"rows_trained": rows, "job_seconds": round(seconds, 1), "job_rows_per_s": round(rows / seconds),
                      "ranking_epoch_seconds": round(epoch[0], 1) if epoch else None,
                      "ranking_rows_per_s": round(rows / epoch[0]) if epoch else None,
                      "retrieval_epoch_seconds": (round(m["train_epoch_seconds"]["retrieval"][0], 1)
                                                  if m["train_epoch_seconds"]["retrieval"] else None),
                      "validation_pass_seconds": m.get("stream", {}).get("validation_pass_seconds"),
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


def _per_row_pipeline(stream, files, columns, schema, batch_size: int, shuffle_buffer: int):
    """The baseline input pipeline: tf.data's own interleave, per-row `unbatch` and `shuffle`, `batch`
    (what `features.stream.log_dataset` did before it mixed and batched rows in numpy)."""
    import tensorflow as tf

    from features.dataset import frame_to_tensors
    from features.stream import catalog_join, split_columns

    ad_columns, log_names, signature = split_columns(columns, schema)

    def rows_of(path: bytes):
        for frame in stream.frames(path.decode(), stream.scratch_report()):
            yield frame_to_tensors(frame, log_names, schema)

    ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files]).interleave(
        lambda p: tf.data.Dataset.from_generator(rows_of, output_signature=signature, args=(p,)), cycle_length=2)
    ds = ds.unbatch().shuffle(shuffle_buffer, seed=0).batch(batch_size).map(catalog_join(stream.catalog, ad_columns,
                                                                                          schema))
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(2)


def pipeline_rates(spec: Path, batch_size: int, shuffle_buffer: int, rounds: int = 2) -> dict:
    """Rows/s of the ranking stage's input pipeline alone (no training) over `spec`'s log: the job's
    (`log_dataset`) against the per-row tf.data baseline, in this process, alternated `rounds` times so
    both see the same load."""
    from features.spec import load_spec
    from features.stream import log_dataset, open_stream

    loaded = load_spec(spec)
    schema = loaded.schema()
    stream = open_stream(loaded)
    columns = (*schema.query_features, *schema.ad_string_features, schema.click, schema.position, schema.conversion)
    make = {"numpy_pool": lambda: log_dataset(stream, stream.files, columns, schema, batch_size,
                                              shuffle_buffer=shuffle_buffer),
            "per_row_tf_data": lambda: _per_row_pipeline(stream, stream.files, columns, schema, batch_size,
                                                         shuffle_buffer)}
    seconds: dict[str, list[float]] = {name: [] for name in make}
    rows = 0
    for _ in range(rounds):
        for name, build in make.items():
            t0, rows = time.perf_counter(), 0
            for batch in build():
                rows += int(batch[schema.click].shape[0])
            seconds[name].append(time.perf_counter() - t0)
            print(f"pipeline {name}: {rows:,d} rows in {seconds[name][-1]:.1f}s", file=sys.stderr)
    rates = {name: round(rows / min(s)) for name, s in seconds.items()}
    return {"rows": rows, "batch_size": batch_size, "shuffle_buffer": shuffle_buffer, "rows_per_s": rates,
            "speedup": round(rates["numpy_pool"] / rates["per_row_tf_data"], 2),
            "note": "input pipeline alone, no training; best of the alternated rounds"}


def _run_child(raw: dict, work: Path, name: str) -> dict:
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    log_file = work / f"{name}.log"  # the child's progress lines, to follow a long run
    print(f"{name}: training (progress in {log_file})", file=sys.stderr)
    with open(log_file, "w") as err:
        run = subprocess.run([sys.executable, __file__, "--child", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=err, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stdout[-3000:] + log_file.read_text()[-5000:])
        raise SystemExit(f"{name} run failed (exit {run.returncode})")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {**out, "wall_seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--piece-rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--in-memory-rows", type=int, default=1_000_000)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000, help="data.stream.shuffle_buffer")
    parser.add_argument("--hash-users", type=int, default=0, help="hash user ids into this many buckets (0: vocab)")
    parser.add_argument("--work", default="", help="keep the files here (default: a temporary directory)")
    parser.add_argument("--out", default="runs/bench/streaming.json")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(Path(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        t0 = time.perf_counter()
        spec = write_inputs(work / "data", args.rows, args.files, args.piece_rows, args.users)
        write_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in (work / "data" / "logs").iterdir()) / 2**20
        print(f"wrote {args.rows:,d} rows in {args.files} Parquet files ({size_mb:.0f} MB) in {write_s:.0f}s",
              file=sys.stderr)
        sub_rows = min(args.in_memory_rows, args.rows)
        sub_spec = write_inputs(work / "subsample", sub_rows, max(1, args.files * sub_rows // args.rows),
                                args.piece_rows, args.users)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        pipeline = pipeline_rates(sub_spec, OVERRIDES["ranking"]["batch_size"], args.shuffle_buffer)
        print(f"input pipeline alone on {pipeline['rows']:,d} rows: {pipeline['rows_per_s']['numpy_pool']:,d} rows/s "
              f"(numpy pool) against {pipeline['rows_per_s']['per_row_tf_data']:,d} (per-row tf.data shuffle), "
              f"{pipeline['speedup']}x", file=sys.stderr)
        # The short in-memory run first, its numbers kept, so a long streaming run that is stopped leaves them.
        in_memory = _run_child(_config(sub_spec, work / "memory", False, 0, args.shuffle_buffer), work, "in_memory")
        out.write_text(json.dumps({"benchmark": "streaming", "rows": args.rows, "in_memory": in_memory,
                                   "input_pipeline": pipeline, "streaming": "not finished"}, indent=2))
        streamed = _run_child(_config(spec, work / "stream", True, args.hash_users, args.shuffle_buffer), work,
                              "stream")
    result = {
        "benchmark": "streaming", "rows": args.rows, "files": args.files, "parquet_mb": round(size_mb, 1),
        "write_seconds": round(write_s, 1), "hash_users": args.hash_users, "streaming": streamed,
        "input_pipeline": pipeline,
        "in_memory": {**in_memory, "rows_read": sub_rows,
                      "note": f"the in-memory path on the first {sub_rows:,d} rows only (a log it can hold), "
                              "its split's training rows trained; rows/s compare, RSS does not"},
        "rss_budget_mb": RSS_BUDGET_MB, "under_budget": streamed["peak_rss_mb"] <= RSS_BUDGET_MB,
        "config": OVERRIDES, "cpus": os.cpu_count(), "python": platform.python_version()}
    print(f"streaming: {args.rows:,d} rows, one epoch of retrieval + ranking in {streamed['job_seconds']:.0f}s "
          f"({streamed['job_rows_per_s']:,d} rows/s end to end; ranking epoch {streamed['ranking_rows_per_s']:,d} "
          f"rows/s); peak RSS {streamed['peak_rss_mb']:.0f} MB "
          f"({'under' if result['under_budget'] else 'OVER'} the {RSS_BUDGET_MB} MB budget)")
    print(f"input pipeline alone ({pipeline['rows']:,d} rows, no training): {pipeline['rows_per_s']['numpy_pool']:,d} "
          f"rows/s against {pipeline['rows_per_s']['per_row_tf_data']:,d} for a per-row tf.data shuffle "
          f"({pipeline['speedup']}x)")
    print(f"in-memory (subsample of {sub_rows:,d} rows, not the full log): {in_memory['rows_trained']:,d} training "
          f"rows, {in_memory['job_rows_per_s']:,d} rows/s end to end; ranking epoch "
          f"{in_memory['ranking_rows_per_s']:,d} rows/s; peak RSS {in_memory['peak_rss_mb']:.0f} MB")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if result["under_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
