"""Retrieval on real data, the full model against its baselines, trained and evaluated in one run.

Trains the job of `--config` (default `configs/movielens.yaml`: ml-latest-small, rating >= 4 is
a positive, the last 20 % of ratings by time held out) with `adrec train`'s code path, no export:
the two-tower model (history, logQ, accidental-hit removal), the ID-only two-tower baseline of
the TFRS basic retrieval tutorial on the same training positives, and most-popular. Prints
Recall@K and NDCG@K (K = 10, 50, 100) over the whole catalog, for all held-out positives, warm
and cold-start ads and users unseen in training, and writes the metrics as JSON.

    .venv/bin/python benchmarks/movielens_retrieval.py                      # configs/movielens.yaml
    .venv/bin/python benchmarks/movielens_retrieval.py --config configs/demo.yaml --set retrieval.epochs=4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = (("full model", "model"), ("ID-only two-tower", "id_only"), ("most-popular", "most_popular"))


def format_table(r: dict, ks=(10, 50, 100)) -> str:
    lines = [f"held-out positives {r['test_positives']} ({r['cold_test_positives']} on cold-start ads, "
             f"{r['unseen_user_test_positives']} from users unseen in training"
             + (f", {r['test_positives_with_history']} with a history" if "test_positives_with_history" in r else "")
             + f"); catalog {r['catalog_size']} ads",
             f"  {'':28s}" + "".join(f"{'Recall@' + str(k):>11s}" for k in ks)
             + "".join(f"{'NDCG@' + str(k):>10s}" for k in ks)]
    for subset, suffix in (("all", ""), ("warm ads", "_warm"), ("cold-start ads", "_cold"),
                           ("users seen in training", "_seen_users"), ("unseen users", "_unseen_users")):
        if r.get("model" + suffix, {}).get("recall@10") != r.get("model" + suffix, {}).get("recall@10"):
            continue  # NaN: no held-out positive in this subset
        lines.append(f"  {subset}:")
        for label, key in MODELS:
            m = r.get(key + suffix)
            if m is None:
                continue
            lines.append(f"    {label:26s}" + "".join(f"{m[f'recall@{k}']:11.3f}" for k in ks)
                         + "".join(f"{m[f'ndcg@{k}']:10.3f}" for k in ks))
    def ratio(a, b):
        return f"{r[a]['recall@100'] / r[b]['recall@100']:.2f}x" if r[b]["recall@100"] > 0 else "inf (baseline 0)"

    if "id_only" in r:
        lines.append(f"  full / ID-only Recall@100: {ratio('model', 'id_only')} (all), "
                     f"{ratio('model_cold', 'id_only_cold')} (cold-start ads)")
    lines.append(f"  full / most-popular Recall@100: {ratio('model', 'most_popular')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "movielens.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. retrieval.epochs=4")
    parser.add_argument("--model-dir", default="runs/bench/movielens_retrieval")
    parser.add_argument("--out", default="runs/bench/movielens_retrieval.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from trainer.config import config_to_dict, load_config
    from trainer.job import run_training

    cfg = load_config(args.config, args.set)
    cfg.training.model_dir = args.model_dir
    started = time.time()
    trained = run_training(cfg, progress=not args.quiet)
    wall = time.time() - started
    r = trained.metrics["retrieval"]
    print(f"\n{args.config} {' '.join(args.set)}")
    print(format_table(r, tuple(cfg.retrieval.eval_ks)))
    print(f"  ranking AUC {trained.metrics['ranking']['auc']:.4f}; wall time {wall:.0f} s (training both models "
          f"and the baseline, evaluation; data loading included)")
    write_report(Path(args.out), "movielens_retrieval", config=args.config, overrides=args.set,
                 wall_seconds=round(wall, 1), retrieval=r, ranking_auc=trained.metrics["ranking"]["auc"],
                 job_config=config_to_dict(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
