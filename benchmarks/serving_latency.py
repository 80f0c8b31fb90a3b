"""Latency and throughput of `RecommendationClient.recommend` against the embedded server.

For each catalog size it trains a real (tiny-BERT) model on a synthetic world with that many
ads, exports it, starts the server in a child process on 127.0.0.1, and measures, in the same
run and over the same requests:

- `recommend over gRPC`: the client's `recommend()` (retrieve N over the whole catalog, rank
  them, top k; request building, gRPC and response parsing included);
- `TF1 session, no gRPC`: the same recommender SavedModel run in this process;
- `top-K matmul (floor)`: the bare [1 x d] @ [d x n_ads] scores + top_k(N) in TensorFlow.

at concurrency 1 and 8 (threads sharing one client). Prints a table and writes JSON.

    .venv/bin/python benchmarks/serving_latency.py --ads 10000 100000 --out runs/bench/serving_latency.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_and_export(n_ads: int, workdir: Path):
    from features.synthetic import SyntheticConfig
    from trainer.config import load_config
    from trainer.export import export_all
    from trainer.job import run_training

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.data.synthetic = SyntheticConfig(n_users=1000, n_advertisers=max(30, n_ads // 100), n_ads=n_ads,
                                         n_impressions=20000)
    cfg.retrieval.epochs = 1
    cfg.evaluation.baselines = ()  # quality baselines are not what this measures
    cfg.ranking.epochs = 1
    cfg.export.retrieve_n = 100
    cfg.export.recommend_k = 10
    cfg.training.model_dir = str(workdir / "run")
    cfg.export.export_dir = str(workdir / "models")
    trained = run_training(cfg, progress=False)
    export = export_all(trained, cfg.export.export_dir)
    return trained, export


def requests_from(trained, n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    schema = trained.schema
    rows = trained.split.test.sample(n=n, replace=True, random_state=seed)
    out = []
    for _, row in rows.iterrows():
        user = {c: row[c] for c in (schema.user_id, *schema.user_categoricals)}
        context = {c: (int(row[c]) if schema.is_int_feature(c) else row[c])
                   for c in (*schema.context_categoricals, *schema.context_integers)}
        out.append((user, context))
    return out


def measure(call, items: list, concurrency: int) -> dict:
    """Run call(item) for every item on `concurrency` threads; per-call latency and overall rate."""
    latencies = np.zeros(len(items))
    errors = []
    cursor = iter(range(len(items)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                call(items[i])
            except Exception as err:  # noqa: BLE001  (counted and reported)
                errors.append(repr(err))
            latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = latencies * 1e3
    return {"requests": len(items), "errors": len(errors), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "rps": len(items) / wall}


def bench_catalog(n_ads: int, n_requests: int, concurrencies: list[int], k: int) -> list[dict]:
    from serving.client import RecommendationClient
    from serving.process import ServerProcess
    from serving.servable import Servable
    from trainer.evaluate import ad_embeddings, query_embeddings

    results = []
    with tempfile.TemporaryDirectory(prefix=f"adrec-bench-{n_ads}-") as tmp:
        t0 = time.time()
        trained, export = train_and_export(n_ads, Path(tmp))
        print(f"[bench] {n_ads} ads: trained and exported in {time.time() - t0:.0f}s", flush=True)
        requests = requests_from(trained, n_requests)
        schema = trained.schema
        retrieve_n = trained.config.export.retrieve_n

        # The floor: bare scores + top-K over the catalog's ad embeddings.
        ads = tf.constant(ad_embeddings(trained.retrieval, trained.catalog, schema))
        rows = trained.split.test.sample(n=n_requests, replace=True, random_state=0)
        queries = query_embeddings(trained.retrieval, rows, schema)

        @tf.function
        def top_k(q):
            return tf.math.top_k(tf.linalg.matmul(q, ads, transpose_b=True), k=retrieve_n)

        query_items = [tf.constant(queries[i:i + 1]) for i in range(len(queries))]
        for q in query_items[:20]:
            top_k(q)

        servable = Servable("recommender", export.version, export.paths["recommender"])
        graph_items = [{k2: np.array([v], dtype=np.int64 if isinstance(v, int) else object)
                        for k2, v in {**u, **c}.items()} for u, c in requests]
        history_shape = servable.signature()[0].get("history")  # the user's recent ads: none here
        for item in graph_items if history_shape is not None else []:
            item["history"] = np.full((1, history_shape.shape[1]), "", dtype=object)
        for item in graph_items:  # nothing excluded, as the client sends it
            item["excluded_ad_ids"] = np.array([[""]], dtype=object)
        for item in graph_items[:20]:
            servable.run(item)

        config = Path(trained.config.export.export_dir) / "models.config"
        with ServerProcess(model_config_file=config, lifetime=1800,
                           extra_args=["--file-system-poll-wait-seconds", "0", "--max-workers", "16"]) as server, \
                RecommendationClient(server.address, timeout=30) as client:
            for u, c in requests[:50]:
                client.recommend(u, c, k=k)
            for concurrency in concurrencies:
                cases = [("recommend over gRPC", lambda r: client.recommend(r[0], r[1], k=k), requests),
                         ("TF1 session, no gRPC", servable.run, graph_items),
                         ("top-K matmul (floor)", top_k, query_items)]
                for what, call, items in cases:
                    row = {"n_ads": n_ads, "what": what, "concurrency": concurrency,
                           **measure(call, items, concurrency)}
                    results.append(row)
                    print(f"[bench] {n_ads:>7} ads  c={concurrency}  {what:22s} p50 {row['p50_ms']:7.2f} ms  "
                          f"p99 {row['p99_ms']:7.2f} ms  {row['rps']:8.0f} req/s  errors {row['errors']}",
                          flush=True)
        servable.close()
    return results


def table(results: list[dict]) -> str:
    """One line per case; `x floor` is the p50 over the bare top-K matmul's p50 (same catalog, concurrency)."""
    floor = {(r["n_ads"], r["concurrency"]): r["p50_ms"] for r in results if r["what"].startswith("top-K")}
    lines = [f"{'ads':>8} {'conc':>4}  {'what':22s} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'x floor':>8}"]
    for r in results:
        ratio = r["p50_ms"] / floor[(r["n_ads"], r["concurrency"])] if (r["n_ads"], r["concurrency"]) in floor \
            else float("nan")
        lines.append(f"{r['n_ads']:>8} {r['concurrency']:>4}  {r['what']:22s} {r['p50_ms']:8.2f} "
                     f"{r['p99_ms']:8.2f} {r['rps']:8.0f} {ratio:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=1000, help="requests per (catalog, concurrency) case")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "serving_latency.json")
    args = parser.parse_args(argv)
    results = []
    for n_ads in args.ads:
        results.extend(bench_catalog(n_ads, args.requests, args.concurrency, args.k))
    write_report(args.out, "serving_latency", requests_per_case=args.requests, k=args.k, retrieve_n=100,
                 results=results)
    print()
    print(table(results))
    target = [r for r in results if r["n_ads"] == 10_000 and r["concurrency"] == 1
              and r["what"] == "recommend over gRPC"]
    if target:
        print(f"\np99 of recommend, 10,000 ads, concurrency 1: {target[0]['p99_ms']:.2f} ms (target < 25 ms)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
