"""Continuous training in a drift world: the loop against a daily retrain from scratch and a frozen model.

The synthetic world's user interests move to other topics on `--drift-day` (SyntheticConfig.drift_day).
Its logs are written as day partitions and `trainer.continuous` runs over them as `adrec continuous
--once` would. For every held-out day from the drift on, three models answer the same held-out
requests through their serving graphs (`trainer.continuous.evaluate_servables`):
- continuous: the version the loop serves after deciding on that day (it never trained on that day);
- scratch: a model trained from scratch on the same window of days;
- frozen: the version served the day before the drift, never updated.
`--broken-day` has its labels shuffled: every candidate that trains on it is reported with its decision.

    python benchmarks/continuous.py --out runs/bench/continuous.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_report import write_report  # first: it sets the quiet defaults before TensorFlow loads

ROOT = Path(__file__).resolve().parents[1]


def shuffle_labels(path: Path, seed: int) -> None:
    import numpy as np
    import pandas as pd

    rows = pd.read_parquet(path)
    order = np.random.default_rng(seed).permutation(len(rows))
    rows[["click", "conversion"]] = rows[["click", "conversion"]].to_numpy()[order]
    rows.to_parquet(path, index=False)


def run(args) -> dict:
    import tensorflow as tf

    from features.partitions import list_partitions, read_window, write_partitions
    from features.synthetic import generate_world
    from serving.contract import RANKING, RETRIEVAL
    from trainer.config import load_config
    from trainer.continuous import (
        Predictor,
        _day_config,
        evaluate_servables,
        evaluate_version,
        gate_k,
        run_loop,
        state_dir_of,
    )
    from trainer.job import run_training
    from trainer.servables import RankingServable, RetrievalServable

    work = Path(tempfile.mkdtemp(prefix="adrec-bench-continuous-", dir=args.work_dir))
    overrides = [f"data.synthetic.{k}={v}" for k, v in (("n_days", args.days), ("drift_day", args.drift_day),
                                                        ("cold_start_days", 0))]
    overrides += [f"continuous.window_days={args.window_days}", f"training.model_dir={work / 'run'}",
                  f"export.export_dir={work / 'models'}", "evaluation.baselines=[most_popular]", *args.set]
    cfg = load_config(args.config, overrides)
    world = generate_world(cfg.data.synthetic)
    logs_dir = work / "logs"
    write_partitions(world.catalog, world.logs, logs_dir)
    days = [p.day for p in list_partitions(logs_dir)]
    drift, broken = days[args.drift_day], days[args.broken_day] if args.broken_day >= 0 else None
    if broken is not None:
        shuffle_labels(logs_dir / f"{broken}.parquet", cfg.training.seed)
    t0 = time.time()
    records = {r["day"]: r for r in run_loop(cfg, logs_dir, once=True, progress=False)}
    loop_seconds = time.time() - t0
    export_dir, k = Path(cfg.export.export_dir), gate_k(cfg)
    key = f"recall@{k}"
    # the version served once the day before the drift was decided
    frozen = max((r["version"] for d, r in records.items() if d < drift and r.get("decision") == "published"),
                 default=None)
    if frozen is None:
        raise SystemExit("no version was published before the drift day: raise --drift-day")
    rows = []
    for i, day in enumerate(days):
        if not args.drift_day <= i < args.drift_day + args.span or day == broken:
            continue
        record = records[day]
        window = list_partitions(logs_dir)[max(0, i - args.window_days):i + 1]
        scratch_cfg = _day_config(cfg, state_dir_of(cfg), day)
        scratch_cfg.training.model_dir = str(work / "scratch" / day)
        trained = run_training(scratch_cfg, tf.distribute.get_strategy(), progress=False,
                               frames=read_window(logs_dir, window))
        test, catalog, schema = trained.split.test, trained.catalog, trained.schema
        scratch = evaluate_servables(Predictor.module(RetrievalServable(trained, cfg.export.top_k)),
                                     Predictor.module(RankingServable(trained.ranking, schema, trained.text)),
                                     test, catalog, schema, k)
        served = record["metrics"]["candidate" if record["decision"] == "published" else "served"]
        rows.append({"day": day, "days_after_drift": days.index(day) - days.index(drift),
                     "decision": record["decision"], "version": record["version"],
                     "continuous": served, "scratch": scratch,
                     "frozen": evaluate_version(export_dir, frozen, test, catalog, schema, k)})
    decisions = [{k2: r.get(k2) for k2 in ("day", "version", "decision", "reason", "trained_on")}
                 | {"metrics": r.get("metrics")} for r in records.values()]
    with_broken = [d for d in decisions if broken is not None and broken in (d.get("trained_on") or [])]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": str(args.config), "set": args.set, "days": days, "drift_day": drift, "broken_day": broken,
            "window_days": args.window_days, "metric": key, "frozen_version": frozen,
            "loop_seconds": round(loop_seconds, 1), "rows": rows, "decisions": decisions,
            "trained_on_broken_day": with_broken,
            "broken_published": any(d["decision"] == "published" for d in with_broken),
            "models": [RETRIEVAL, RANKING]}


def table(result: dict) -> str:
    key = result["metric"]
    lines = [f"{'day':<11} {'after':>5} {'decision':<9} {'cont ' + key:>16} {'scratch':>8} {'frozen':>8} "
             f"{'cont/scr':>8} {'cont AUC':>8} {'scr AUC':>8} {'frz AUC':>8}"]
    for r in result["rows"]:
        c, s, f = r["continuous"], r["scratch"], r["frozen"]
        lines.append(f"{r['day']:<11} {r['days_after_drift']:>5} {r['decision']:<9} {c[key]:16.4f} {s[key]:8.4f} "
                     f"{f[key]:8.4f} {c[key] / s[key]:8.3f} {c['ranking_auc']:8.4f} {s['ranking_auc']:8.4f} "
                     f"{f['ranking_auc']:8.4f}")
    for d in result["trained_on_broken_day"]:
        lines.append(f"candidate {d['version']} for {d['day']} trained on the shuffled day {result['broken_day']}: "
                     f"{d['decision']} ({d['reason']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--drift-day", type=int, default=4, help="0-based day the interests move")
    parser.add_argument("--span", type=int, default=4, help="days compared from the drift day on")
    parser.add_argument("--broken-day", type=int, default=8, help="0-based day whose labels are shuffled (after the "
                        "compared days); the next day's candidate trains on it; -1: none")
    parser.add_argument("--window-days", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "continuous.json")
    args = parser.parse_args(argv)
    result = run(args)
    write_report(args.out, "continuous", **result)
    print(table(result))
    print(json.dumps({"broken_published": result["broken_published"]}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
