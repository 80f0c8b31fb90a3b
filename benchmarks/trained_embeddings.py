"""A trained retrieval model's ad and query embeddings, for `benchmarks/ann.py --embeddings`.

Trains the retrieval stage with the project's own job (`trainer.job.run_training`, no ranking) on the
config's world, runs the trained ad tower over every catalog ad and the trained query tower over held-out
requests of real users of that world (the earliest test row of `--queries` distinct users, drawn with
`--seed`), and writes them to one .npz: `ads` [n_ads, dim], `queries` [n, dim], `ad_ids`, `user_ids`.

    # ~23 min on the 2 cores at a load average of 8-11: the 100k-ad world (1 min), the tiny BERT over the
    # 100k ad texts (45 s, cached), 3 epochs (15 min), the job's evaluation over the catalog (3.5 min)
    nice -n 5 .venv/bin/python benchmarks/trained_embeddings.py --config configs/ann100k.yaml \
        --out runs/bench/ann100k_embeddings.npz
    nice -n 5 .venv/bin/python benchmarks/ann.py --embeddings runs/bench/ann100k_embeddings.npz \
        --out runs/bench/ann_trained.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_report import write_report  # first: it sets the quiet defaults before TensorFlow loads

# isort: split
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[trained_embeddings] {msg}", file=sys.stderr, flush=True)


def query_rows(test: pd.DataFrame, user_column: str, time_column: str, n: int, seed: int) -> pd.DataFrame:
    """The earliest held-out row of each of n distinct users (all users when fewer), drawn with `seed`:
    one query per user, so no user's request counts n times in a recall."""
    first = test.sort_values(time_column, kind="stable").drop_duplicates(user_column)
    if len(first) > n:
        first = first.iloc[np.sort(np.random.default_rng(seed).choice(len(first), n, replace=False))]
    return first.reset_index(drop=True)


def extract(trained, n_queries: int, seed: int) -> dict[str, np.ndarray]:
    """The trained towers' embeddings: every catalog ad, and one held-out request per sampled user."""
    from trainer.evaluate import ad_embeddings, query_embeddings

    schema = trained.schema
    rows = query_rows(trained.split.test, schema.user_id, schema.timestamp, n_queries, seed)
    if rows.empty:
        raise ValueError("the job's test split has no rows: no user request to embed as a query")
    return {"ads": ad_embeddings(trained.retrieval, trained.catalog, schema).astype(np.float32),
            "queries": query_embeddings(trained.retrieval, rows, schema).astype(np.float32),
            "ad_ids": trained.catalog[schema.ad_id].astype(str).to_numpy(),
            "user_ids": rows[schema.user_id].astype(str).to_numpy()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ann100k.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides, as on `adrec train`")
    parser.add_argument("--queries", type=int, default=512, help="distinct users whose requests are the queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "ann100k_embeddings.npz")
    args = parser.parse_args(argv)
    if args.queries < 1:
        parser.error(f"--queries {args.queries}: expected at least 1")
    from trainer.config import load_config
    from trainer.job import run_training

    cfg = load_config(args.config, args.set)
    started = time.time()
    trained = run_training(cfg, with_ranking=False)
    log(f"trained in {time.time() - started:.0f}s; embedding {len(trained.catalog):,d} ads")
    out = extract(trained, args.queries, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")  # np.savez keeps a name ending in .npz as it is
    np.savez(tmp, **out)
    tmp.replace(args.out)
    metrics = trained.metrics["retrieval"]["model"]
    norms = np.linalg.norm(out["ads"], axis=1)
    report = write_report(args.out.with_suffix(".json"), "trained_embeddings", config=args.config,
                          overrides=args.set, embeddings=str(args.out), n_ads=len(out["ads"]),
                          n_queries=len(out["queries"]), dim=int(out["ads"].shape[1]),
                          ad_norm_range=[float(norms.min()), float(norms.max())],
                          train_seconds=round(time.time() - started, 1),
                          retrieval_test={k: v for k, v in metrics.items() if k.startswith("recall@")})
    print(json.dumps({k: report[k] for k in ("n_ads", "n_queries", "dim", "retrieval_test")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
