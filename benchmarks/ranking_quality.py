"""Ranking quality against the synthetic world's ground truth: CTR AUC next to the oracle's, and
calibration (ECE) before and after the in-graph calibrator.

Two honest comparisons, on the held-out (time-split) impressions:
- `with position`: the training-time logit (position tower at the logged position) against the
  oracle `true_p_click` (examination(position) x relevance): both know the position;
- `served`: the exported pCTR (position tower dropped, calibrated) against the oracle
  `true_relevance`: neither uses the position.
Plus a position-only baseline (AUC of -position) and ECE of the served pCTR before/after calibration.

    .venv/bin/python benchmarks/ranking_quality.py --config configs/ranking_check.yaml \
        --out runs/bench/ranking_quality.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ranking_check.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "ranking_quality.json"))
    args = parser.parse_args(argv)

    from trainer.config import load_config
    from trainer.demo import format_ranking_metrics
    from trainer.job import run_training
    from trainer.metrics import auc

    cfg = load_config(args.config)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="adrec-ranking-quality-") as tmp:
        cfg.training.model_dir = str(Path(tmp) / "run")
        trained = run_training(cfg, progress=False)
    seconds = time.time() - started
    k = trained.metrics["ranking"]
    test = trained.split.test
    position_only = auc(test[trained.schema.click].to_numpy(), -test[trained.schema.position].to_numpy())
    print("\n".join(format_ranking_metrics(k)))
    print(f"\n{'':34s}{'model':>8s}{'oracle':>8s}{'gap':>8s}")
    print(f"  {'with position (vs true p_click)':32s}{k['auc_with_position']:8.4f}{k['oracle_auc']:8.4f}"
          f"{k['oracle_auc'] - k['auc_with_position']:8.4f}")
    print(f"  {'served (vs true relevance)':32s}{k['auc']:8.4f}{k['oracle_auc_no_position']:8.4f}"
          f"{k['oracle_auc_no_position'] - k['auc']:8.4f}")
    print(f"  position-only baseline AUC {position_only:.4f}")
    print(f"  served pCTR ECE {k['ece_uncalibrated']:.4f} uncalibrated -> {k['ece']:.4f} calibrated "
          f"({cfg.ranking.calibration}); training took {seconds:.0f}s")
    write_report(Path(args.out), "ranking_quality", config=args.config, ranking=k,
                 position_only_auc=position_only, seconds=round(seconds, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
