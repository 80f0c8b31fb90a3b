"""Retrieval quality against epsilon: the same job trained without DP and with DP-SGD at several noise levels.

Every arm trains the retrieval model of `--config` (default configs/quality/random.yaml: ml-latest-small,
every rating a positive, the TFRS tutorial's seeded random 20 % held out, seen movies excluded) on the
same training rows for the same fixed number of epochs (early stopping would choose the epoch on
held-out rows, outside the accountant, so there is no validation split), with the same seed, and is
scored on the same held-out queries; most-popular, fitted on the same rows, is the floor. DP arms clip
every training row's gradient to `--clip` and add Gaussian noise of `noise x clip` (trainer/dp.py);
epsilon is for one training row at `--delta`, from the RDP accountant.

    .venv/bin/python benchmarks/dp_curve.py                    # table on stdout, logs on stderr
    .venv/bin/python benchmarks/dp_curve.py --noise 1 --epochs 1
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
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_arm(cfg, name: str, workdir: Path) -> dict:
    from trainer.job import run_training
    from trainer.progress import log

    cfg = cfg.model_copy(deep=True)
    cfg.training.model_dir = str(workdir / name.replace(" ", "_"))
    log(f"dp_curve: arm {name}")
    t0 = time.perf_counter()
    trained = run_training(cfg, progress=False, with_ranking=False)
    seconds = time.perf_counter() - t0
    metrics = trained.metrics
    steps = metrics["train_steps"]["retrieval"]
    dp = metrics.get("privacy", {}).get("dp")
    return {"arm": name, "noise_multiplier": dp["noise_multiplier"] if dp else None,
            "l2_clip": dp["l2_clip"] if dp else None, "epsilon": dp["epsilon"] if dp else None,
            "delta": dp["delta"] if dp else None, "steps": steps, "train_seconds": metrics["train_seconds"],
            "job_seconds": seconds, "model": metrics["retrieval"]["model"],
            "most_popular": metrics["retrieval"]["most_popular"]}


def table(results: list[dict]) -> list[str]:
    lines = [f"  {'':22s}{'epsilon':>9s}{'R@10':>8s}{'R@100':>8s}{'N@10':>8s}{'train s':>9s}"]
    for r in results:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        m = r["model"]
        lines.append(f"  {r['arm']:22s}{eps:>9s}{m['recall@10']:8.3f}{m['recall@100']:8.3f}{m['ndcg@10']:8.3f}"
                     f"{r['train_seconds']:9.0f}")
    pop = results[0]["most_popular"]
    lines.append(f"  {'most popular':22s}{'0':>9s}{pop['recall@10']:8.3f}{pop['recall@100']:8.3f}"
                 f"{pop['ndcg@10']:8.3f}{'':>9s}")
    return lines


def main() -> None:
    from trainer.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quality" / "random.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every arm (repeatable)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="noise multipliers")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "dp_curve.json")
    args = parser.parse_args()

    overrides = [*args.set, f"retrieval.epochs={args.epochs}", "evaluation.validation_fraction=0",
                 "evaluation.baselines=[most_popular]"]
    base = load_config(args.config, overrides)
    arms = [("no DP", base)]
    for z in args.noise:
        arms.append((f"DP, noise {z:g}", load_config(args.config, [
            *overrides, "privacy.dp.enabled=true", f"privacy.dp.noise_multiplier={z}",
            f"privacy.dp.l2_clip={args.clip}", f"privacy.dp.delta={args.delta:.3e}"])))  # 1e-06 is a string to YAML
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adrec-dp-curve-") as tmp:
        results = [run_arm(cfg, name, Path(tmp)) for name, cfg in arms]
    protocol = base.evaluation
    print(f"Retrieval under DP-SGD, {Path(args.config).name} (protocol {protocol.protocol}, "
          f"{args.epochs} epoch(s), batch {base.retrieval.batch_size}, clip {args.clip:g}, delta {args.delta:g}; "
          "epsilon per training row):")
    print("\n".join(table(results)))
    print(f"  ({time.perf_counter() - t0:.0f} s in all)")
    write_report(args.out, "dp_curve", config=str(args.config), overrides=overrides, clip=args.clip,
                 delta=args.delta, epochs=args.epochs, results=results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
