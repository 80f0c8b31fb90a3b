"""The IVF index (trainer/ivf_index.py) against brute force and faiss IVF-Flat, on clustered vectors.

Ad embeddings are synthetic unit vectors with cluster structure: `--clusters` Gaussian clusters
with uneven (log-normal) sizes, each ad its cluster's centre plus noise of norm `--spread`,
normalised; queries are drawn the same way. For each catalog size, in one process:
- brute force (the exported default: matmul + top_k in TensorFlow): p50/p99 for one query and a
  batch of 64, index memory;
- IVF for each storage and nprobe: recall@k against the exact top-k, the same latencies, index
  memory and build time (k-means + storage);
- faiss-cpu IndexIVFFlat (inner product, the same number of partitions) at the smallest nprobe
  whose recall reaches the IVF's, when faiss is installed (`pip install 'adrec[bench]'`); the
  report says plainly when it is missing.
Latencies are of a tf.function of the served graph's search (query embedding given), on
however many cores the machine has.

    .venv/bin/python benchmarks/ann.py --ads 100000 1000000 --out runs/bench/ann.json
    .venv/bin/python benchmarks/ann.py --ten-million   # adds 10M ads (about 5 GB, minutes of k-means)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_report import write_report  # first: it sets the quiet defaults before TensorFlow loads

# isort: split
import numpy as np
import tensorflow as tf

from trainer.ivf_index import IvfIndex, build_layout

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[ann] {msg}", file=sys.stderr, flush=True)


def clustered(n: int, centres: np.ndarray, weights: np.ndarray, spread: float, rng) -> np.ndarray:
    """n unit vectors: a centre drawn by weight plus Gaussian noise of norm ~spread, normalised (in chunks)."""
    dim = centres.shape[1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 1_000_000):
        m = min(1_000_000, n - start)
        x = centres[rng.choice(len(centres), m, p=weights)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(ads: tf.Tensor, queries: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([tf.math.top_k(tf.linalg.matmul(queries[i:i + 64], ads, transpose_b=True), k=k)
                           .indices.numpy() for i in range(0, len(queries), 64)])


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def latency(fn, queries: np.ndarray, batch: int, min_calls: int, min_seconds: float) -> dict:
    """p50/p99 ms of `fn` on `batch` queries, cycling through the query set."""
    chunks = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    fn(chunks[0])
    times = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn(chunks[len(times) % len(chunks)])
        times.append((time.perf_counter() - t0) * 1e3)
    return {f"b{batch}_p50_ms": float(np.percentile(times, 50)), f"b{batch}_p99_ms": float(np.percentile(times, 99))}


def timings(fn, queries, args) -> dict:
    out = {}
    for batch in args.batch:
        out.update(latency(fn, queries, batch, args.min_calls, args.min_seconds))
    return out


def faiss_at_recall(faiss, ads, queries, exact, targets, n_partitions, k, args) -> list[dict]:
    """faiss IVF-Flat (one build), at the smallest nprobe (powers of 2 and --nprobe) reaching each target recall."""
    started = time.perf_counter()
    quantiser = faiss.IndexFlatIP(ads.shape[1])
    index = faiss.IndexIVFFlat(quantiser, ads.shape[1], n_partitions, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = args.seed
    index.cp.niter = args.iterations
    index.cp.max_points_per_centroid = 64  # the same bounded training sample as the IVF build
    index.train(ads)
    index.add(ads)
    build = time.perf_counter() - started
    probes = sorted({*(2**i for i in range(n_partitions.bit_length())), *args.nprobe, n_partitions})
    reached = []  # (nprobe, recall), until the highest target is reached
    for nprobe in (p for p in probes if p <= n_partitions):
        index.nprobe = nprobe
        reached.append((nprobe, recall(index.search(queries, k)[1], exact)))
        if reached[-1][1] >= max(targets):
            break
    rows: dict[int, dict] = {}  # one row per nprobe, with the IVF recalls it matches
    for target in targets:
        nprobe, got = next(((p, r) for p, r in reached if r >= target), reached[-1])
        if nprobe in rows:
            rows[nprobe]["target_recalls"].append(target)
            continue
        index.nprobe = nprobe
        rows[nprobe] = {"method": "faiss_ivf_flat", "target_recalls": [target], "nprobe": nprobe, "recall": got,
                        "build_seconds": build,
                        # float32 vectors, int64 ids, centroids
                        "index_mb": (ads.nbytes + len(ads) * 8 + n_partitions * ads.shape[1] * 4) / 2**20,
                        **timings(lambda q: index.search(q, k), queries, args)}
    return list(rows.values())


def bench_size(n_ads: int, args, faiss) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, args.clusters)
    weights /= weights.sum()
    started = time.perf_counter()
    ads = clustered(n_ads, centres, weights, args.spread, rng)
    queries = clustered(args.queries, centres, weights, args.spread, rng)
    log(f"{n_ads} ads x {args.dim} in {args.clusters} clusters ({time.perf_counter() - started:.1f}s)")
    k = min(args.k, n_ads)
    ads_tf = tf.constant(ads)
    exact = exact_top(ads_tf, queries, k)

    @tf.function(reduce_retracing=True)
    def brute(q):
        return tf.math.top_k(tf.linalg.matmul(q, ads_tf, transpose_b=True), k=k)

    rows = [{"n_ads": n_ads, "method": "brute_force", "recall": 1.0, "index_mb": ads.nbytes / 2**20,
             **timings(lambda q: brute(q).values.numpy(), queries, args)}]
    log(f"brute force: {rows[-1]}")
    layout = build_layout(ads, args.partitions, seed=args.seed, iterations=args.iterations)
    log(f"layout {layout.describe()}")
    ids = tf.range(n_ads)
    for storage in args.storage:
        t0 = time.perf_counter()
        index = IvfIndex(None, ads, ids, layout, nprobe=1, storage=storage)
        stored = time.perf_counter() - t0
        for nprobe in args.nprobe:
            index.nprobe = min(nprobe, index.n_partitions)
            search = tf.function(lambda q, index=index: index.search(q, k), reduce_retracing=True)
            found = np.concatenate([search(queries[i:i + 64])[1].numpy() for i in range(0, len(queries), 64)])
            row = {"n_ads": n_ads, "method": "ivf", "storage": storage, "nprobe": index.nprobe,
                   "recall": recall(found, exact), "index_mb": index.nbytes() / 2**20,
                   "build_seconds": layout.build_seconds + stored, **layout.describe(),
                   **timings(lambda q, search=search: search(q)[0].numpy(), queries, args)}
            rows.append(row)
            log(f"ivf {storage} nprobe {index.nprobe}: recall {row['recall']:.4f} "
                f"p50 {row['b1_p50_ms']:.2f} ms (batch 1)")
    if faiss is not None:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        targets = sorted({r["recall"] for r in rows if r["method"] == "ivf" and r["storage"] == "float32"})
        for row in faiss_at_recall(faiss, ads, queries, exact, targets, layout.n_partitions, k, args):
            rows.append({"n_ads": n_ads, **row})
            log(f"faiss nprobe {row['nprobe']}: recall {row['recall']:.4f} p50 {row['b1_p50_ms']:.2f} ms")
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'ads':>9} {'method':<15} {'storage':<9} {'nprobe':>6} {'recall':>7} {'b1 p50':>7} {'b1 p99':>7} "
             f"{'b64 p50':>8} {'b64 p99':>8} {'x brute':>7} {'MiB':>7} {'build s':>7}"]
    brute = {r["n_ads"]: r["b1_p50_ms"] for r in rows if r["method"] == "brute_force"}
    for r in rows:
        lines.append(f"{r['n_ads']:>9} {r['method']:<15} {r.get('storage', ''):<9} {r.get('nprobe', ''):>6} "
                     f"{r['recall']:7.4f} {r['b1_p50_ms']:7.2f} {r['b1_p99_ms']:7.2f} {r.get('b64_p50_ms', 0):8.2f} "
                     f"{r.get('b64_p99_ms', 0):8.2f} {brute[r['n_ads']] / r['b1_p50_ms']:7.1f} "
                     f"{r['index_mb']:7.1f} {r.get('build_seconds', 0):7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--ten-million", action="store_true", help="also 10M ads (about 5 GB of RAM)")
    parser.add_argument("--dim", type=int, default=64, help="embedding size (retrieval.embedding_dim)")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise norm around a cluster centre")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--queries", type=int, default=512, help="queries for recall (and cycled for latency)")
    parser.add_argument("--partitions", type=int, default=0, help="0: ~4 sqrt(n_ads), like export.ivf_partitions")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--storage", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--min-calls", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each case at least this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "ann.json")
    args = parser.parse_args(argv)
    args.queries = max(args.queries, max(args.batch))
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss-cpu is not installed: no faiss IVF-Flat comparison (pip install 'adrec[bench]')", flush=True)
    sizes = [*args.ads, *([10_000_000] if args.ten_million else [])]
    rows = [r for n in sizes for r in bench_size(n, args, faiss)]
    write_report(args.out, "ann", dim=args.dim, k=args.k, clusters=args.clusters, spread=args.spread,
                 faiss=faiss.__version__ if faiss is not None else "not installed", results=rows)
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
