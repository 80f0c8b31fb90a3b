"""The IVF index (trainer/ivf_index.py) against brute force and faiss IVF-Flat, on clustered vectors
or a trained model's embeddings.

Ad embeddings are synthetic unit vectors with cluster structure: `--clusters` Gaussian clusters
with uneven (log-normal) sizes, each ad its cluster's centre plus noise of norm `--spread`,
normalised; queries are drawn the same way. Or, with `--embeddings FILE.npz`, a trained retrieval
model's ad tower over its whole catalog (`ads`) and its query tower over held-out requests of real
users (`queries`), as benchmarks/trained_embeddings.py writes them: recall is then against the exact
top-k of the same model. For each catalog, in one process:
- brute force (the exported default: matmul + top_k in TensorFlow): p50/p99 for one query and a
  batch of 64, index memory;
- IVF for each storage and nprobe: recall@k against the exact top-k, the same latencies, index
  memory and build time (k-means + storage), and where the exact top-k lies in the partitions (how
  many hold it, the nprobe that covers it: what decides the nprobe a recall needs);
- faiss-cpu IndexIVFFlat (inner product, the same number of partitions) at the smallest nprobe
  whose recall reaches the IVF's, when faiss is installed (`pip install 'adrec[bench]'`); the
  report says plainly when it is missing.
Latencies are of a tf.function of the served graph's search (query embedding given), on
however many cores the machine has. The machine is shared, so all cases of a catalog size are timed
in interleaved rounds in one process (`--rounds`), each row records the 1-minute load average over
its rounds, and `b1_x_brute` / `b64_x_brute` (brute force's p50 over the row's) are the fairer
numbers under load.

    .venv/bin/python benchmarks/ann.py --ads 100000 1000000 --out runs/bench/ann.json
    # 10M ads: ~11 GB of RAM at peak (catalog, its TF copy for brute force, the IVF storage and its
    # build, faiss); faiss on the IVF's own k-means instead of a second one, float32 only
    .venv/bin/python benchmarks/ann.py --ads 10000000 --partitions 4000 --iterations 5 --storage float32 \
        --nprobe 4 8 16 32 --faiss-shared-partitions --keep-other-sizes --out runs/bench/ann.json
    # a trained model's 100k ads (the recipe: benchmarks/trained_embeddings.py)
    .venv/bin/python benchmarks/ann.py --embeddings runs/bench/ann100k_embeddings.npz --out runs/bench/ann_trained.json
"""

from __future__ import annotations

import argparse
import json
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


def exact_top(ads: tf.Tensor, queries: np.ndarray, k: int, ad_chunk: int = 1 << 20) -> np.ndarray:
    """The exact top k by inner product, 64 queries at a time over chunks of 1M ads ([64, 1M] scores,
    256 MB), merged: each chunk of ads is read once per 64 queries."""
    out = []
    for i in range(0, len(queries), 64):
        values, indices = [], []
        for j in range(0, ads.shape[0], ad_chunk):
            chunk = ads[j:j + ad_chunk]
            top = tf.math.top_k(tf.linalg.matmul(queries[i:i + 64], chunk, transpose_b=True),
                                k=min(k, chunk.shape[0]))
            values.append(top.values)
            indices.append(top.indices + j)
        best = tf.math.top_k(tf.concat(values, axis=1), k=k).indices
        out.append(tf.gather(tf.concat(indices, axis=1), best, batch_dims=1).numpy())
    return np.concatenate(out)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def top_spread(layout, queries: np.ndarray, exact: np.ndarray) -> dict:
    """How a query's exact top k sits in the partitions: how many partitions hold it, and the nprobe
    (partitions taken by centroid score, as the search takes them) that covers all of it. Skewed or
    near-tied embeddings spread the top k, and the nprobe a recall needs follows."""
    partition = np.empty(len(layout.order), np.int64)
    for j in range(layout.n_partitions):
        partition[layout.order[layout.starts[j]:layout.starts[j] + layout.sizes[j]]] = j
    holding = np.array([len(np.unique(partition[row])) for row in exact])
    covering = np.empty(len(queries), np.int64)
    for i in range(0, len(queries), 64):  # [64, P] centroid ranks at a time
        order = np.argsort(-(queries[i:i + 64] @ layout.centroids.T), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
        covering[i:i + 64] = np.take_along_axis(rank, partition[exact[i:i + 64]], axis=1).max(axis=1) + 1
    return {"top_partitions_mean": float(holding.mean()), "top_partitions_median": float(np.median(holding)),
            "nprobe_covering_top_median": float(np.median(covering)),
            "nprobe_covering_top_p90": float(np.percentile(covering, 90))}


class Timer:
    """Latencies of several cases, timed in interleaved rounds in one process: the machine is shared, so
    every case sees the same mix of load, and ratios between cases are fairer than absolute ms."""

    def __init__(self, queries: np.ndarray, batches: list[int]):
        self.chunks = {b: [queries[i:i + b] for i in range(0, len(queries) - b + 1, b)] for b in batches}
        self.cases: list[tuple[dict, int, object, list, list]] = []  # (row, batch, fn, times ms, load averages)

    def add(self, row: dict, fn, batches=None) -> None:
        for batch, chunks in self.chunks.items():
            if batches is not None and batch not in batches:
                continue
            fn(chunks[0])  # traced and warm
            self.cases.append((row, batch, fn, [], []))

    def run(self, rounds: int, seconds: float, min_calls: int) -> None:
        """`rounds` passes over every case, each pass at least seconds / rounds and min_calls / rounds
        calls long (a slow case stops after 2 calls once it has taken 4x its share)."""
        share = seconds / rounds
        for r in range(rounds):
            for _row, batch, fn, times, loads in self.cases:
                chunks = self.chunks[batch]
                started = time.perf_counter()
                calls = 0
                while calls < max(1, min_calls // rounds) or time.perf_counter() - started < share:
                    t0 = time.perf_counter()
                    fn(chunks[len(times) % len(chunks)])
                    times.append((time.perf_counter() - t0) * 1e3)
                    calls += 1
                    if calls >= 2 and time.perf_counter() - started > 4 * share:
                        break
                loads.append(os.getloadavg()[0])
            log(f"timing round {r + 1}/{rounds}, load {os.getloadavg()[0]:.1f}")
        for row, batch, _, times, loads in self.cases:
            row.update({f"b{batch}_p50_ms": float(np.percentile(times, 50)),
                        f"b{batch}_p99_ms": float(np.percentile(times, 99)), f"b{batch}_calls": len(times),
                        f"b{batch}_load_avg_1m": [round(min(loads), 2), round(max(loads), 2)]})


def faiss_index(faiss, ads: np.ndarray, layout, args):
    """faiss IndexIVFFlat (inner product, as many partitions). Own k-means (the same bounded sample of 64
    ads per partition), or with --faiss-shared-partitions the IVF's own centroids and assignment (no
    second k-means: then both search exactly the same ads at the same nprobe)."""
    started = time.perf_counter()
    dim, n_partitions = ads.shape[1], layout.n_partitions
    quantiser = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantiser, dim, n_partitions, faiss.METRIC_INNER_PRODUCT)
    if args.faiss_shared_partitions:
        quantiser.add(layout.centroids)
        index.is_trained = True
        for j in range(n_partitions):
            rows = layout.order[layout.starts[j]:layout.starts[j] + layout.sizes[j]].astype(np.int64)
            codes = np.ascontiguousarray(ads[rows]).view(np.uint8)
            index.invlists.add_entries(j, len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(codes))
        index.ntotal = len(ads)
    else:
        index.cp.seed = args.seed
        index.cp.niter = args.iterations
        index.cp.max_points_per_centroid = 64  # the same bounded training sample as the IVF build
        index.train(ads)
        index.add(ads)
    return index, time.perf_counter() - started


def faiss_rows(faiss, ads, queries, exact, targets, layout, k, args) -> list[tuple[dict, object]]:
    """faiss IVF-Flat at the smallest nprobe (powers of 2, --nprobe) reaching each target recall."""
    index, build = faiss_index(faiss, ads, layout, args)
    n_partitions = layout.n_partitions
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
        rows[nprobe] = {"method": "faiss_ivf_flat", "target_recalls": [target], "nprobe": nprobe, "recall": got,
                        "build_seconds": build, "shared_partitions": args.faiss_shared_partitions,
                        # float32 vectors, int64 ids, centroids
                        "index_mb": (ads.nbytes + len(ads) * 8 + n_partitions * ads.shape[1] * 4) / 2**20}

    def search(q, nprobe):
        index.nprobe = nprobe
        return index.search(q, k)

    return [(row, lambda q, nprobe=nprobe: search(q, nprobe)) for nprobe, row in rows.items()]


def synthetic(n_ads: int, args) -> tuple[np.ndarray, np.ndarray]:
    """`n_ads` clustered ads and `args.queries` queries drawn the same way (module docstring)."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, args.clusters)
    weights /= weights.sum()
    started = time.perf_counter()
    ads = clustered(n_ads, centres, weights, args.spread, rng)
    queries = clustered(args.queries, centres, weights, args.spread, rng)
    log(f"{n_ads} ads x {args.dim} in {args.clusters} clusters ({time.perf_counter() - started:.1f}s)")
    return ads, queries


def load_embeddings(path: Path, min_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """`ads` [n, d] and `queries` [m, d] from an .npz (benchmarks/trained_embeddings.py writes one), checked:
    2-D, the same width, finite, at least `min_queries` queries (the largest timed batch)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = sorted({"ads", "queries"} - set(data.files))
            if missing:
                raise SystemExit(f"--embeddings {path}: no array(s) {missing} (it has {sorted(data.files)})")
            ads, queries = data["ads"], data["queries"]
    except (OSError, ValueError) as err:  # not a file, not an .npz, or an object array
        raise SystemExit(f"--embeddings {path}: cannot read it as an .npz of arrays ({err})") from err
    for name, array in (("ads", ads), ("queries", queries)):
        if array.ndim != 2 or not len(array) or not np.issubdtype(array.dtype, np.floating):
            raise SystemExit(f"--embeddings {path}: {name!r} is {array.dtype} {array.shape}; expected a non-empty "
                             "2-D float array")
        if not np.isfinite(array).all():
            raise SystemExit(f"--embeddings {path}: {name!r} holds NaN or infinite values")
    if ads.shape[1] != queries.shape[1]:
        raise SystemExit(f"--embeddings {path}: ads are {ads.shape[1]}-d but queries {queries.shape[1]}-d")
    if len(queries) < min_queries:
        raise SystemExit(f"--embeddings {path}: {len(queries)} queries, fewer than the largest --batch "
                         f"({min_queries})")
    log(f"{len(ads)} ads x {ads.shape[1]} and {len(queries)} queries from {path}")
    return ads.astype(np.float32), queries.astype(np.float32)


def bench_size(ads: np.ndarray, queries: np.ndarray, args, faiss, source: str) -> list[dict]:
    n_ads = len(ads)
    started = time.perf_counter()
    k = min(args.k, n_ads)
    ads_tf = tf.constant(ads)
    ads = np.asarray(ads_tf)  # shares the tensor's buffer: one copy of the catalog (2.5 GB at 10M), not two
    exact = exact_top(ads_tf, queries, k)
    log(f"exact top {k} of {len(queries)} queries ({time.perf_counter() - started:.1f}s)")
    timer = Timer(queries, args.batch)

    @tf.function(reduce_retracing=True)
    def brute(q):
        return tf.math.top_k(tf.linalg.matmul(q, ads_tf, transpose_b=True), k=k)

    rows = [{"n_ads": n_ads, "source": source, "method": "brute_force", "recall": 1.0,
             "index_mb": ads.nbytes / 2**20}]
    # The exported brute force scores a batch against every ad at once: [batch, n] floats
    brute_batches = [b for b in args.batch if b * n_ads * 4 <= args.max_brute_scores_gb * 2**30]
    rows[-1]["batches_not_timed"] = sorted(set(args.batch) - set(brute_batches))
    timer.add(rows[-1], lambda q: brute(q).values.numpy(), brute_batches)
    layout = build_layout(ads, args.partitions, seed=args.seed, iterations=args.iterations)
    placement = top_spread(layout, queries, exact)
    log(f"layout {layout.describe()}; the exact top {k} of a query: {placement}")
    ids = tf.range(n_ads)
    for storage in args.storage:
        t0 = time.perf_counter()
        index = IvfIndex(None, ads, ids, layout, nprobe=1, storage=storage)
        stored = time.perf_counter() - t0
        for nprobe in args.nprobe:
            nprobe = min(nprobe, index.n_partitions)

            def search(q, index=index, nprobe=nprobe):
                index.nprobe = nprobe  # read when traced: each tf.function keeps its own
                return index.search(q, k)

            search = tf.function(search, reduce_retracing=True)
            found = np.concatenate([search(queries[i:i + 64])[1].numpy() for i in range(0, len(queries), 64)])
            row = {"n_ads": n_ads, "source": source, "method": "ivf", "storage": storage, "nprobe": nprobe,
                   "recall": recall(found, exact), "index_mb": index.nbytes() / 2**20,
                   "build_seconds": layout.build_seconds + stored, **layout.describe(), **placement}
            rows.append(row)
            timer.add(row, lambda q, search=search: search(q)[0].numpy())
            log(f"ivf {storage} nprobe {nprobe}: recall {row['recall']:.4f}")
    if faiss is not None:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        ivf = [r for r in rows if r["method"] == "ivf"]
        targets = sorted({r["recall"] for r in ivf if r["storage"] == "float32"} or {r["recall"] for r in ivf})
        for row, fn in faiss_rows(faiss, ads, queries, exact, targets, layout, k, args):
            rows.append({"n_ads": n_ads, "source": source, **row})
            timer.add(rows[-1], fn)
            log(f"faiss nprobe {row['nprobe']}: recall {row['recall']:.4f}")
    timer.run(args.rounds, args.min_seconds, args.min_calls)
    for row in rows:
        row.update({f"b{b}_x_brute": rows[0][f"b{b}_p50_ms"] / row[f"b{b}_p50_ms"] for b in brute_batches})
        log(f"{row['method']} {row.get('storage', '')} nprobe {row.get('nprobe', '-')}: recall {row['recall']:.4f} "
            f"p50 {row['b1_p50_ms']:.2f} ms (batch 1)")
    return rows


def ms(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"  # "-": not timed


def table(rows: list[dict]) -> str:
    lines = [f"{'ads':>9} {'method':<15} {'storage':<9} {'nprobe':>6} {'recall':>7} {'b1 p50':>7} {'b1 p99':>7} "
             f"{'b64 p50':>8} {'b64 p99':>8} {'x brute':>7} {'MiB':>7} {'build s':>7}"]
    for r in rows:
        lines.append(f"{r['n_ads']:>9} {r['method']:<15} {r.get('storage', ''):<9} {r.get('nprobe', ''):>6} "
                     f"{r['recall']:7.4f} {r['b1_p50_ms']:7.2f} {r['b1_p99_ms']:7.2f} {ms(r, 'b64_p50_ms'):>8} "
                     f"{ms(r, 'b64_p99_ms'):>8} {r['b1_x_brute']:7.1f} "
                     f"{r['index_mb']:7.1f} {r.get('build_seconds', 0):7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, nargs="+", help="synthetic catalog sizes (default 100k and 1M)")
    parser.add_argument("--embeddings", type=Path,
                        help="an .npz of a trained model's `ads` and `queries` (benchmarks/trained_embeddings.py) "
                             "instead of synthetic vectors; --ads, --dim, --clusters, --spread, --queries unused")
    parser.add_argument("--ten-million", action="store_true", help="also 10M ads (~11 GB of RAM at peak)")
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
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each case at least this long in all")
    parser.add_argument("--max-brute-scores-gb", type=float, default=1.0,
                        help="brute force is not timed at a batch whose [batch, ads] scores exceed this")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds over all cases")
    parser.add_argument("--faiss-shared-partitions", action="store_true",
                        help="faiss uses the IVF's k-means (no second k-means; its build time is then the add only)")
    parser.add_argument("--keep-other-sizes", action="store_true",
                        help="keep the rows of other catalog sizes already in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "ann.json")
    args = parser.parse_args(argv)
    if args.embeddings is not None and (args.ads or args.ten_million):
        parser.error("--embeddings measures the file's catalog: no --ads / --ten-million with it")
    args.queries = max(args.queries, max(args.batch))
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss-cpu is not installed: no faiss IVF-Flat comparison (pip install 'adrec[bench]')", flush=True)
    if args.embeddings is not None:
        ads, queries = load_embeddings(args.embeddings, max(args.batch))
        rows = bench_size(ads, queries, args, faiss, f"trained:{args.embeddings.name}")
        vectors = {"source": "trained", "embeddings": str(args.embeddings), "dim": ads.shape[1],
                   "queries": len(queries)}
    else:
        sizes = [*(args.ads or [100_000, 1_000_000]), *([10_000_000] if args.ten_million else [])]
        rows = [r for n in sizes for r in bench_size(*synthetic(n, args), args, faiss, "synthetic")]
        vectors = {"source": "synthetic", "dim": args.dim, "clusters": args.clusters, "spread": args.spread,
                   "queries": args.queries}
    if args.keep_other_sizes and args.out.exists():
        done = {(r["source"], r["n_ads"]) for r in rows}  # rows written before sources were named are synthetic
        rows += [r for r in json.loads(args.out.read_text())["results"]
                 if (r.get("source", "synthetic"), r["n_ads"]) not in done]
        rows.sort(key=lambda r: r["n_ads"])
    write_report(args.out, "ann", k=args.k, **vectors,
                 faiss=faiss.__version__ if faiss is not None else "not installed", results=rows)
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
