"""The ad text encoder's training modes side by side: frozen, top layers, LoRA and full fine-tuning.

Trains the same job per `encoder.mode` (`frozen`: MiniLM's text embeddings cached per ad;
`top_layers`: the last `encoder.trainable_layers` transformer layers train; `lora`: rank
`encoder.lora_rank` adapters on every attention's query and value projections train; `full`: all of
BERT trains) on the same rows, with the same seed, on (a) the synthetic demo world
(`configs/demo.yaml`) and (b) MovieLens ml-latest-small (`configs/movielens.yaml`). The towers keep
the config's learning rate in every mode; a trainable encoder steps with its own Adam
(`encoder.fine_tune_learning_rate`), whose rate each mode picks from a grid of the same size (`GRID`,
or `--grid`) by Recall@100 on a validation split carved from the training rows
(`evaluation.validation_fraction`, the same rows held out in every mode, frozen included); the
chosen run is reported on the test rows. Per mode: the encoder's trainable parameters (and their share
of full fine-tuning's), the retrieval fit's training examples per second, retrieval Recall@100 of the
held-out clicks over the catalog, and the ranking model's CTR AUC (it reads the ad text embeddings
of the encoder the retrieval fit left, so a fine-tuned encoder reaches ranking too). Every grid
point's validation and test recall is in the JSON report.

A trainable MiniLM runs on every batch (~60-100 examples/s on 2 CPU cores against thousands
cached), so both data sets are subsampled to keep the whole run under an hour there: the demo
world with fewer impressions, ml-latest-small with a seeded share of its users (and the movies they
rated as the catalog), and few retrieval epochs. The output says how much.

    .venv/bin/python benchmarks/encoder_modes.py            # ~70 min idle (18 MiniLM jobs); tables: stdout
    .venv/bin/python benchmarks/encoder_modes.py --quick    # tiny encoder and world, about a minute (the test)
    .venv/bin/python benchmarks/encoder_modes.py --from-report runs/bench/encoder_modes.json  # its tables again
"""

from __future__ import annotations

import argparse
import contextlib
import math
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

MODES = ("frozen", "top_layers", "lora", "full")
# The encoder learning rates each trainable mode tries: the same number per mode, around the usual
# rates (pretrained-BERT fine-tuning 1e-5..1e-4; LoRA adapters ~10x that), spaced ~3-5x and reaching
# above them: the runs are short (~18 steps), so the lowest usual rates are left out and the highest
# point checks that the best rate is not above the grid.
GRID = {"top_layers": (5e-5, 2e-4, 1e-3), "lora": (1e-3, 3e-3, 1e-2), "full": (5e-5, 2e-4, 1e-3)}
QUICK_GRID = {"top_layers": (1e-3,), "lora": (1e-2,), "full": (1e-3,)}  # one point: the plumbing, in a minute


def parse_grid(items: list[str], base: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    """`MODE=RATE,RATE,...` items over `base`; every trainable mode must end with as many rates."""
    grid = dict(base)
    for item in items:
        mode, sep, rates = item.partition("=")
        if not sep or mode not in grid:
            raise SystemExit(f"--grid {item!r}: expected MODE=RATE[,RATE...] with MODE one of {sorted(grid)}")
        try:
            values = tuple(float(r) for r in rates.split(","))
        except ValueError:
            raise SystemExit(f"--grid {item!r}: the rates must be numbers") from None
        if not all(0 < v < 1 for v in values):
            raise SystemExit(f"--grid {item!r}: every rate must be in (0, 1)")
        grid[mode] = values
    if len({len(v) for v in grid.values()}) != 1:
        raise SystemExit(f"--grid: every mode needs as many rates (a fair search), got {grid}")
    return grid


def parameter_count(variables) -> int:
    return int(sum(v.numpy().size for v in variables))


def movielens_frames(cfg, user_share: float, seed: int):
    """ml-latest-small through its data spec, a seeded `user_share` of its users kept with all their
    ratings (the time split then holds out the last 20 % of those), and only the movies they rated as
    the catalog: every encoder pass over the catalog (history text, retrieval evaluation, the ranking
    model's table) costs per movie."""
    import numpy as np

    from features.loader import load_dataset
    from features.spec import load_spec

    loaded = load_dataset(load_spec(cfg.data.spec, root=cfg.data.root or None))
    catalog, logs, schema = loaded.catalog, loaded.logs, loaded.schema
    users = np.sort(logs[schema.user_id].unique())
    keep = np.random.default_rng(seed).choice(users, size=max(2, round(user_share * len(users))), replace=False)
    logs = logs[logs[schema.user_id].isin(set(keep))].reset_index(drop=True)
    catalog = catalog[catalog[schema.ad_id].isin(set(logs[schema.ad_id]))].reset_index(drop=True)
    note = (f"{len(keep)} of {len(users)} users (seeded {user_share:.0%}), their {len(logs):,d} ratings, "
            f"the {len(catalog):,d} movies they rated as the catalog")
    return (catalog, logs), schema, note


def run_mode(config: str, overrides: list[str], mode: str, rate: float | None, workdir: Path, frames=None,
             schema=None) -> dict:
    """One job in `mode`; `rate`: the encoder's own learning rate (None: frozen)."""
    from trainer.config import load_config
    from trainer.job import run_training
    from trainer.text_encoder import load_backbone

    name = mode if rate is None else f"{mode}-{rate:g}"
    cfg = load_config(config, [*overrides, f"encoder.mode={mode}", f"training.model_dir={workdir / name}",
                               *([] if rate is None else [f"encoder.fine_tune_learning_rate={rate!r}"])])
    t0 = time.perf_counter()
    trained = run_training(cfg, progress=False, frames=frames, schema=schema)
    seconds = time.perf_counter() - t0
    adapter, train = trained.text.adapter, trained.split.train
    # Full fine-tuning trains every backbone weight but the unused pooled [CLS] projection: counted on a
    # fresh load with nothing frozen but that, the denominator of every mode's share.
    fresh = load_backbone(cfg.encoder, trained.text.tokenizer.vocabulary_size(), seed=cfg.training.seed)
    full = parameter_count(fresh.trainable_variables)
    trainable = parameter_count(adapter.trainable_weights)
    if cfg.evaluation.validation_fraction > 0:  # the fit read the training rows less those held for validation
        from features.protocol import split_logs

        train = split_logs(train, cfg.evaluation.validation(), trained.schema).train
    positives = int((train[trained.schema.click] > 0).sum())  # what one retrieval epoch reads
    epochs = trained.metrics["train_epoch_seconds"]["retrieval"]
    # The first epoch also traces the step function; later ones time the steps alone.
    timed = epochs[1:] or epochs
    k = max(cfg.retrieval.eval_ks)
    retrieval, ranking = trained.metrics["retrieval"], trained.metrics["ranking"]
    validation_metrics = retrieval.get("model_validation", {})
    validation = validation_metrics.get(f"recall@{k}")
    return {"mode": mode, "encoder_learning_rate": rate, "trainable_parameters": trainable, "full_parameters": full,
            "share_of_full": trainable / full, "retrieval_positives": positives,
            "retrieval_epoch_seconds": epochs,
            "examples_per_second": positives * len(timed) / max(sum(timed), 1e-9),
            "recall_at_k": k, "recall": retrieval["model"][f"recall@{k}"], "validation_recall": validation,
            "test_clicks": retrieval["model"]["queries"], "validation_clicks": validation_metrics.get("queries"),
            "recall_most_popular": retrieval["most_popular"][f"recall@{k}"],
            "ranking_auc": ranking["auc"], "ranking_gauc": ranking.get("gauc"), "job_seconds": round(seconds, 1)}


def standard_error(recall: float, clicks: int | None) -> float:
    """Recall@K's standard error over `clicks` held-out clicks, each a hit or a miss (binomial); NaN
    without clicks."""
    if not clicks:
        return float("nan")
    return math.sqrt(recall * (1 - recall) / clicks)


def chosen(runs: list[dict]) -> dict:
    """The run with the highest validation recall (the lower rate on a tie: runs come in grid order)."""
    return max(runs, key=lambda r: r["validation_recall"] if r["validation_recall"] is not None else -1.0)


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:g}"


def format_table(name: str, rows: list[dict], grid_runs: list[dict]) -> list[str]:
    k = rows[0]["recall_at_k"]
    lines = [f"  {name}", f"  {'mode':12s}{'enc. lr':>9s}{'trainable':>13s}{'% of full':>11s}{'examples/s':>12s}"
                          f"{'val R@' + str(k):>11s}{'R@' + str(k):>9s}{'SE':>7s}{'rank AUC':>10s}{'job s':>8s}"]
    for r in rows:
        lines.append(f"  {r['mode']:12s}{_rate(r['encoder_learning_rate']):>9s}{r['trainable_parameters']:13,d}"
                     f"{100 * r['share_of_full']:10.2f}%{r['examples_per_second']:12.1f}"
                     f"{r['validation_recall'] or float('nan'):11.3f}{r['recall']:9.3f}"
                     f"{standard_error(r['recall'], r.get('test_clicks')):7.3f}{r['ranking_auc']:10.4f}"
                     f"{r['job_seconds']:8.0f}")
    popular = rows[0]["recall_most_popular"]
    lines.append(f"  {'most popular':12s}{'':56s}{popular:9.3f}"
                 f"{standard_error(popular, rows[0].get('test_clicks')):7.3f}")
    lines.append(f"  SE: the binomial standard error of one R@{k} over the {rows[0].get('test_clicks')} test clicks "
                 f"(validation: {rows[0].get('validation_clicks')} clicks)")
    lines.append(f"  grid (encoder lr: validation / test R@{k}): " + "; ".join(
        f"{r['mode']} {_rate(r['encoder_learning_rate'])}: {r['validation_recall'] or float('nan'):.3f} / "
        f"{r['recall']:.3f}" for r in grid_runs if r["encoder_learning_rate"] is not None))
    return lines


def verdict(rows: list[dict]) -> str | None:
    """The goal: LoRA within 0.01 Recall@K of full fine-tuning with under 2 % of its trainable parameters."""
    by = {r["mode"]: r for r in rows}
    if "lora" not in by or "full" not in by:
        return None
    lora, full = by["lora"], by["full"]
    gap = lora["recall"] - full["recall"]
    close, small = gap >= -0.01, lora["share_of_full"] < 0.02
    # Both recalls are over the same clicks, so (hits agreeing more often than not) the gap's own
    # standard error is at most that of two independent estimates.
    spread = math.hypot(standard_error(lora["recall"], lora.get("test_clicks")),
                        standard_error(full["recall"], full.get("test_clicks")))
    return (f"  LoRA - full: R@{lora['recall_at_k']} {gap:+.3f} (standard error at most {spread:.3f}; "
            f"{'within' if close else 'NOT within'} 0.01 of "
            f"full or above), {100 * lora['share_of_full']:.2f}% of full's trainable parameters "
            f"({'under' if small else 'NOT under'} 2%): goal {'met' if close and small else 'not met'}")


def rows_by_mode(runs: list[dict], modes) -> list[dict]:
    """Each mode's chosen run, in `modes` order; modes with no run are left out."""
    return [chosen(grid_runs) for mode in modes if (grid_runs := [r for r in runs if r["mode"] == mode])]


def report_lines(report: dict) -> list[str]:
    """The tables and verdicts of a saved report (`--out`), from a run stopped early too: it is
    written after every job. A mode that ran fewer rates than the grid says so, as its choice was
    made on fewer points than the others'."""
    grid = report["grid"]
    lines = []
    for name, table in report["datasets"].items():
        runs = table["runs"]
        if not runs:
            continue
        lines += ["", f"{name}: {table['subsample']}", *format_table(name, rows_by_mode(runs, report["modes"]), runs)]
        short = [f"{mode} ran {ran} of its {len(grid[mode])} rates" for mode in report["modes"] if mode in grid
                 and (ran := sum(r["mode"] == mode for r in runs)) < len(grid[mode])]
        if short:
            lines.append("  grid NOT complete: " + "; ".join(short))
        line = verdict(rows_by_mode(runs, report["modes"]))
        if line:
            lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--datasets", nargs="+", default=["demo", "movielens"], choices=["demo", "movielens"])
    parser.add_argument("--demo-impressions", type=int, default=30000,
                        help="impressions of the demo world (configs/demo.yaml has 120,000)")
    parser.add_argument("--movielens-users", type=float, default=0.1,
                        help="share of ml-latest-small's users kept (seeded), with all their ratings")
    parser.add_argument("--epochs", type=int, default=3, help="retrieval epochs, every mode and data set")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--grid", nargs="*", default=[], metavar="MODE=RATE,RATE",
                        help=f"the encoder learning rates a mode tries (default {GRID}; --quick: {QUICK_GRID})")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="share of the training rows held out to choose each mode's encoder rate on")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: configs/tiny.yaml's random tiny BERT on a small world, 1 epoch (< 60 s)")
    parser.add_argument("--out", default="runs/bench/encoder_modes.json")
    parser.add_argument("--from-report", metavar="JSON",
                        help="train nothing: print the tables of a report this benchmark wrote (a run stopped "
                             "early too)")
    args = parser.parse_args(argv)
    if args.from_report:
        import json

        try:
            report = json.loads(Path(args.from_report).read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--from-report {args.from_report}: {error}")
        if report.get("benchmark") != "encoder_modes":
            parser.error(f"--from-report {args.from_report}: not an encoder_modes report")
        try:
            print("\n".join(report_lines(report)))
        except (KeyError, TypeError) as error:
            parser.error(f"--from-report {args.from_report}: a field is missing or malformed ({error!r})")
        return 0
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be in (0, 1)")
    args.grid = parse_grid(args.grid, QUICK_GRID if args.quick else GRID)
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the jobs' log lines; results are printed to `results`
        return _run(args, results)


def _run(args, results) -> int:
    from trainer.config import config_to_dict, load_config
    from trainer.progress import log

    def say(text: str) -> None:
        print(text, file=results, flush=True)

    started = time.time()
    # Every mode of a data set loads the same config with the same overrides; only encoder.mode differs.
    # The retrieval baselines other than most-popular (the ID-only two-tower) read no text: the same in
    # every mode, so they are left out.
    common = [f"training.seed={args.seed}", "evaluation.baselines=[most_popular]",
              f"evaluation.validation_fraction={args.validation_fraction}", "evaluation.refit=false"]
    jobs = {}  # data set -> (config file, overrides, frames, schema, what was subsampled)
    if args.quick:
        jobs["tiny (quick)"] = (str(ROOT / "configs" / "tiny.yaml"),
                                [*common, "data.synthetic.n_impressions=6000", "retrieval.epochs=1",
                                 "ranking.epochs=1"], None, None, "configs/tiny.yaml, 6,000 impressions, 1 epoch")
    else:
        epochs = [*common, f"retrieval.epochs={args.epochs}"]
        if "demo" in args.datasets:
            path = str(ROOT / "configs" / "demo.yaml")
            note = (f"{args.demo_impressions:,d} of the demo world's "
                    f"{load_config(path).data.synthetic.n_impressions:,d} impressions")
            jobs["demo world"] = (path, [*epochs, f"data.synthetic.n_impressions={args.demo_impressions}"],
                                  None, None, note)
        if "movielens" in args.datasets:
            path = str(ROOT / "configs" / "movielens.yaml")
            frames, schema, note = movielens_frames(load_config(path), args.movielens_users, args.seed)
            jobs["ml-latest-small"] = (path, epochs, frames, schema, note)
    tables: dict = {}

    def report(wall: float) -> None:  # after every job too: a run stopped early keeps what it measured
        write_report(Path(args.out), "encoder_modes", quick=args.quick, seed=args.seed, modes=args.modes,
                     grid={m: list(r) for m, r in args.grid.items()}, datasets=tables, wall_seconds=round(wall, 1))

    with tempfile.TemporaryDirectory(prefix="adrec-encoder-modes-") as tmp:
        for name, (path, overrides, frames, schema, note) in jobs.items():
            cfg = load_config(path, overrides)
            runs: list[dict] = []
            tables[name] = {"subsample": note, "config": config_to_dict(cfg), "overrides": overrides, "runs": runs}
            rows = []
            for mode in args.modes:
                grid_runs = []
                for rate in args.grid.get(mode, (None,)):
                    log(f"{name}: encoder.mode {mode}, encoder learning rate {_rate(rate)}")
                    grid_runs.append(run_mode(path, overrides, mode, rate, Path(tmp) / name.split()[0], frames,
                                              schema))
                    log(f"{name}, {mode}: {grid_runs[-1]}")
                    runs.append(grid_runs[-1])
                    report(time.time() - started)
                rows.append(chosen(grid_runs))
            tables[name]["rows"] = rows
            say(f"\n{name}: {note}; encoder {cfg.encoder.preset!r}, seed {args.seed}, {cfg.retrieval.epochs} "
                f"retrieval epoch(s) of {rows[0]['retrieval_positives']:,d} positives, batch "
                f"{cfg.retrieval.batch_size}, towers' learning rate {cfg.retrieval.learning_rate} (retrieval) and "
                f"{cfg.ranking.learning_rate} (ranking), fp32; top_layers = the last "
                f"{cfg.encoder.trainable_layers}, LoRA rank {cfg.encoder.lora_rank}; each trainable mode's "
                f"encoder learning rate chosen by validation R@{rows[0]['recall_at_k']} "
                f"({args.validation_fraction:.0%} of the training rows held out in every mode)")
            say("\n".join(format_table(name, rows, runs)))
            line = verdict(rows)
            if line:
                say(line)
    wall = time.time() - started
    say(f"\n  examples/s: the retrieval fit's positives per second of training steps, the first epoch (tracing) "
        f"left out when there are more; wall time {wall / 60:.1f} min")
    report(wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
