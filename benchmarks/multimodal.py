"""Multimodal creatives: ranking AUC and retrieval Recall@100 with the ads' creative vectors fused in
both ad towers against text-only, on one synthetic world whose clicks depend partly on the vector (same
world, same seed, one run; `data.ad_vectors: ignore` is the text-only run).

    .venv/bin/python benchmarks/multimodal.py --config configs/multimodal.yaml \
        --out runs/bench/multimodal.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_report import write_report

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("vector + text", "use"), ("text only", "ignore"))


def _run(config: str, overrides: list[str], ad_vectors: str, tmp: Path) -> dict:
    from trainer.config import apply_overrides, load_config
    from trainer.job import run_training

    cfg = apply_overrides(load_config(config), [*overrides, f"data.ad_vectors={ad_vectors}"])
    cfg.training.model_dir = str(tmp / ad_vectors)
    started = time.time()
    trained = run_training(cfg, progress=False)
    ranking, retrieval = trained.metrics["ranking"], trained.metrics["retrieval"]
    return {"ad_vectors": ad_vectors, "vector_dim": trained.schema.ad_vector_dim,
            "auc": ranking["auc"], "gauc": ranking.get("gauc"), "oracle_auc": ranking["oracle_auc_no_position"],
            "recall@10": retrieval["model"]["recall@10"], "recall@100": retrieval["model"]["recall@100"],
            "cold_recall@100": retrieval["model_cold"]["recall@100"],
            "cold_test_positives": retrieval["cold_test_positives"], "seconds": round(time.time() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "multimodal.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "multimodal.json"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for both runs (repeatable)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="adrec-multimodal-") as tmp:
        rows = {label: _run(args.config, args.set, mode, Path(tmp)) for label, mode in RUNS}
    print(f"\n{'':16s}{'AUC':>8s}{'gAUC':>8s}{'oracle':>8s}{'R@10':>8s}{'R@100':>8s}{'cold R@100':>12s}{'seconds':>9s}")
    for label, r in rows.items():
        print(f"  {label:14s}{r['auc']:8.4f}{r['gauc']:8.4f}{r['oracle_auc']:8.4f}{r['recall@10']:8.4f}"
              f"{r['recall@100']:8.4f}{r['cold_recall@100']:12.4f}{r['seconds']:9.0f}")
    with_vector, text_only = rows["vector + text"], rows["text only"]
    gain = {k: with_vector[k] - text_only[k] for k in ("auc", "gauc", "recall@10", "recall@100", "cold_recall@100")}
    print(f"  gain with the vector: AUC {gain['auc']:+.4f}, gAUC {gain['gauc']:+.4f}, "
          f"Recall@10 {gain['recall@10']:+.4f}, Recall@100 {gain['recall@100']:+.4f}, "
          f"cold-start Recall@100 {gain['cold_recall@100']:+.4f} "
          f"({with_vector['cold_test_positives']} held-out positives on cold-start ads)")
    write_report(Path(args.out), "multimodal", config=args.config, overrides=args.set, runs=rows, gain=gain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
