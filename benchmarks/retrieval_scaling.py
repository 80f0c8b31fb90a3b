"""Brute-force top-K retrieval cost as the catalog grows (10k -> 100k -> 1M ads), in one run.

The servable retrieval index is brute force in the graph (docs/architecture.md): scores =
queries @ ad_embeddings^T, then top_k. For each catalog size this times that computation in
TensorFlow for a single query and for a batch of queries, and reports the memory it needs:
the index itself (n_ads x dim float32), the score matrix per batch, and the process's
resident memory growth measured while the index is held. Ad embeddings are random unit
vectors of the retrieval model's dimension (the cost does not depend on their values).

    .venv/bin/python benchmarks/retrieval_scaling.py --ads 10000 100000 1000000 --out runs/bench/retrieval_scaling.json
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from bench_report import write_report  # first: it sets the quiet defaults before TensorFlow loads

# isort: split
import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_calls(fn, arg, min_calls: int, min_seconds: float) -> np.ndarray:
    fn(arg)  # trace
    fn(arg)
    times = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn(arg)[0].numpy()
        times.append(time.perf_counter() - t0)
    return np.array(times)


def bench_size(n_ads: int, dim: int, k: int, batches: list[int], min_calls: int, min_seconds: float) -> list[dict]:
    before = rss_mb()
    ads = tf.constant(unit_rows(n_ads, dim, seed=1))
    held = rss_mb() - before

    @tf.function(reduce_retracing=True)
    def top_k(queries):
        return tf.math.top_k(tf.linalg.matmul(queries, ads, transpose_b=True), k=k)

    rows = []
    for batch in batches:
        queries = tf.constant(unit_rows(batch, dim, seed=2))
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time_calls(top_k, queries, min_calls, min_seconds) * 1e3
        rows.append({"n_ads": n_ads, "batch": batch, "calls": len(t), "p50_ms": float(np.percentile(t, 50)),
                     "p99_ms": float(np.percentile(t, 99)), "ms_per_query": float(np.percentile(t, 50)) / batch,
                     "queries_per_s": batch / (float(np.median(t)) / 1e3),
                     "index_mb": n_ads * dim * 4 / 2**20, "scores_mb_per_batch": batch * n_ads * 4 / 2**20,
                     "rss_growth_index_mb": held,
                     "peak_rss_mb": max(peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
    return rows


def table(results: list[dict]) -> str:
    """One line per (catalog, batch); `x 10k` is ms/query over the smallest catalog's at that batch."""
    smallest = min(r["n_ads"] for r in results)
    base = {r["batch"]: r["ms_per_query"] for r in results if r["n_ads"] == smallest}
    lines = [f"{'ads':>9} {'batch':>5} {'p50 ms':>8} {'ms/query':>9} {'queries/s':>10} {'x smallest':>10} "
             f"{'index MiB':>10} {'scores MiB':>10} {'RSS +MiB':>9}"]
    for r in results:
        lines.append(f"{r['n_ads']:>9} {r['batch']:>5} {r['p50_ms']:8.2f} {r['ms_per_query']:9.3f} "
                     f"{r['queries_per_s']:10.0f} {r['ms_per_query'] / base[r['batch']]:10.1f} "
                     f"{r['index_mb']:10.1f} {r['scores_mb_per_batch']:10.1f} {r['rss_growth_index_mb']:9.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64, help="embedding size (retrieval.embedding_dim)")
    parser.add_argument("-k", type=int, default=100, help="top-K (export.top_k)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--min-calls", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each case at least this long")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "retrieval_scaling.json")
    args = parser.parse_args(argv)
    results = []
    for n_ads in args.ads:
        rows = bench_size(n_ads, args.dim, args.k, args.batch, args.min_calls, args.min_seconds)
        for r in rows:
            print(f"[bench] {n_ads:>9} ads  batch {r['batch']:>4}  p50 {r['p50_ms']:8.2f} ms  "
                  f"{r['queries_per_s']:9.0f} queries/s", flush=True)
        results.extend(rows)
    write_report(args.out, "retrieval_scaling", dim=args.dim, k=args.k, results=results)
    print()
    print(f"brute-force top-{args.k} over {args.dim}-d float32 ad embeddings")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
