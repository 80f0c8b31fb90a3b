"""Does masked-LM adaptation of the frozen encoder on the ad texts help retrieval? Both arms in one run.

Trains the demo job's retrieval model (synthetic world, bundled MiniLM, frozen and cached) twice
with the same seed: once on the stock encoder, once after `encoder.masked_lm.epochs` of
continued masked-LM pre-training on the training ads' texts. Prints Recall@K overall and on
warm and cold-start ads, the held-out masked-token accuracy before/after, and the costs.

    .venv/bin/python benchmarks/encoder_adaptation.py --out runs/bench/encoder_adaptation.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def run_arm(cfg, name: str, workdir: Path) -> dict:
    from trainer.job import run_training

    cfg = copy.deepcopy(cfg)
    cfg.training.model_dir = str(workdir / name)
    t0 = time.perf_counter()
    trained = run_training(cfg, progress=False)
    retrieval = trained.metrics["retrieval"]
    return {"arm": name, "seconds": time.perf_counter() - t0,
            "recall": {part: retrieval[part] for part in ("model", "model_warm", "model_cold", "most_popular")},
            "masked_lm": trained.metrics.get("encoder_masked_lm")}


def table(results: list[dict], k: int) -> str:
    lines = [f"{'encoder':24s} {'R@' + str(k) + ' all':>9} {'warm':>7} {'cold':>7} {'MLM acc':>15} {'job s':>7}"]
    for r in results:
        rec = r["recall"]
        mlm = r["masked_lm"]
        acc = f"{mlm['holdout_accuracy_before']:.3f}->{mlm['holdout_accuracy_after']:.3f}" if mlm else "-"
        lines.append(f"{r['arm']:24s} {rec['model'][f'recall@{k}']:9.3f} {rec['model_warm'][f'recall@{k}']:7.3f} "
                     f"{rec['model_cold'][f'recall@{k}']:7.3f} {acc:>15} {r['seconds']:7.0f}")
    pop = results[0]["recall"]["most_popular"][f"recall@{k}"]
    lines.append(f"{'most popular':24s} {pop:9.3f}")
    return "\n".join(lines)


def main() -> None:
    from trainer.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--mlm-epochs", type=int, default=3)
    parser.add_argument("--mlm-learning-rate", type=float, default=5e-5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "encoder_adaptation.json")
    args = parser.parse_args()

    cfg = load_config(args.config)
    cfg.ranking.epochs = 1  # this benchmark compares retrieval; ranking is trained only because the job does
    adapted = copy.deepcopy(cfg)
    adapted.encoder.masked_lm.epochs = args.mlm_epochs
    adapted.encoder.masked_lm.learning_rate = args.mlm_learning_rate
    with tempfile.TemporaryDirectory(prefix="adrec-encoder-adaptation-") as tmp:
        results = [run_arm(cfg, "frozen", Path(tmp)),
                   run_arm(adapted, f"frozen + masked-LM x{args.mlm_epochs}", Path(tmp))]
    k = max(cfg.retrieval.top_k_metrics)
    print(table(results, k))
    write_report(args.out, "encoder_adaptation", config=str(args.config), encoder=cfg.encoder.preset,
                 results=results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
