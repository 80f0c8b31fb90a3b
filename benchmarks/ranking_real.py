"""Ranking on real logs: the ranking model against every baseline, on the same rows, in one run.

Trains the ranking stage of `--config` (default `configs/movielens.yaml`: ml-latest-small, a rating
>= 4 is a click among the rated movies, the last 20 % of ratings by time held out) exactly as
`adrec train` does (`trainer.ranking_stage`: a probe early-stopped on validation gAUC, the served
model on all training rows, calibration fitted on the probe's out-of-sample logits), fits the
baselines of `trainer.ranking_baselines` on the same training rows, and scores everything on the
same test rows: AUC, gAUC (per-user AUC weighted by the user's test rows, over users with both
labels), log loss and ECE, with a paired bootstrap (users resampled, one seed) of the model against
the best baseline by gAUC.

The model trains once per history pooling of `--pools` (`ranking.history_pool`: `mean`, and
`target_attention`, DIN's attention of the candidate ad over the history) and per seed of `--seeds`,
all on the same rows, so the two poolings and the logistic regression are compared in one run:
AUC and gAUC per arm as mean and sd over seeds, and paired bootstraps over users of the seed-mean
gAUC of attention minus mean pooling and of attention minus the logistic regression.

With `--text-cache-check` (opt-in: through the TF1 loader it encodes every row's text with MiniLM,
several minutes, more than the rest of the run), the cached ad text of the exported ranking graph:
`--score-rows` known-ad test rows scored through the TF1 loader (as TF Serving runs it) by the graph
with the catalog's text table, and by one that runs the tokenizer and encoder on every row; both must
give the same scores.

    .venv/bin/python benchmarks/ranking_real.py                 # results on stdout, logs on stderr
    .venv/bin/python benchmarks/ranking_real.py --pools mean --seeds 42 --text-cache-check
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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


def _metrics(labels, probs, users) -> dict:
    from trainer.metrics import auc, expected_calibration_error, group_auc, log_loss

    g = group_auc(labels, probs, users)
    return {"auc": auc(labels, probs), "gauc": g["gauc"], "logloss": log_loss(labels, probs),
            "ece": expected_calibration_error(labels, probs), "gauc_users": g["groups"]}


def format_table(rows: dict[str, dict], uses: dict[str, str]) -> list[str]:
    lines = [f"  {'':34s}{'AUC':>8s}{'gAUC':>8s}{'logloss':>9s}{'ECE':>8s}  reads"]
    for name, m in rows.items():
        lines.append(f"  {name:34s}{m['auc']:8.4f}{m['gauc']:8.4f}{m['logloss']:9.4f}{m['ece']:8.4f}  {uses[name]}")
    return lines


def text_cache_check(trained_ranking, schema, catalog, text, test, n_rows: int, out_dir: Path) -> dict:
    """Export the ranking graph with and without the text table; score `n_rows` known-ad rows the TF1 way."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from trainer.servables import RankingServable
    from trainer.serving_artifacts import as_numpy_features

    known = test[test[schema.ad_id].isin(set(catalog[schema.ad_id]))]
    rows = known.sample(n=min(n_rows, len(known)), replace=len(known) < n_rows, random_state=0)
    rows = rows.drop(columns=[c for c in schema.ad_text if c in rows]).merge(
        catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id, how="left")
    trained_ranking.interact.jit = False
    result = {"rows": int(len(rows))}
    scores = {}
    for cache in (True, False):
        module = RankingServable(trained_ranking, schema, text, cache_text=cache)
        path = out_dir / ("cached" if cache else "encoder")
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
        graph = tf.Graph()
        quiet = tf.get_logger().level
        tf.get_logger().setLevel("ERROR")  # the TF1 loader's deprecation notice: it is how TF Serving loads
        with tf.compat.v1.Session(graph=graph) as sess:
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(path))
            tf.get_logger().setLevel(quiet)
            sig = meta.signature_def["serving_default"]
            feats = as_numpy_features(rows, tuple(sig.inputs), schema)
            fetch = sig.outputs["pctr"].name
            batch = 1024
            sess.run(fetch, {sig.inputs[k].name: v[:batch] for k, v in feats.items()})  # warm up
            started = time.perf_counter()
            out = [sess.run(fetch, {sig.inputs[k].name: v[i:i + batch] for k, v in feats.items()})
                   for i in range(0, len(rows), batch)]
            seconds = time.perf_counter() - started
        scores[cache] = np.concatenate(out)
        result["cached_seconds" if cache else "encoder_seconds"] = round(seconds, 3)
    result["speedup"] = round(result["encoder_seconds"] / max(result["cached_seconds"], 1e-9), 1)
    result["max_abs_difference"] = float(np.abs(scores[True] - scores[False]).max())
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "movielens.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. ranking.epochs=4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2],
                        help="model seeds: the table shows the first, a line every one")
    parser.add_argument("--pools", nargs="+", default=["mean", "target_attention"],
                        choices=["mean", "target_attention"],
                        help="ranking.history_pool of each model arm, every one trained with every seed")
    parser.add_argument("--text-cache", default="runs/bench/ranking_real_text.npy",
                        help="where the frozen encoder's catalog embeddings are kept between runs ('' = never)")
    parser.add_argument("--score-rows", type=int, default=20000)
    parser.add_argument("--text-cache-check", action="store_true",
                        help="also time the exported graph with and without the text table (slow: opt-in)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="runs/bench/ranking_real.json")
    args = parser.parse_args(argv)
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the job's log lines; results are printed to `results`
        return _run(args, results)


def _run(args, results) -> int:
    import numpy as np

    def say(text: str) -> None:
        print(text, file=results, flush=True)

    import tensorflow as tf

    from trainer.builders import build_text_assets
    from trainer.config import config_to_dict, load_config
    from trainer.evaluate import predict_ranking
    from trainer.metrics import auc, bootstrap_gauc_difference, group_auc, paired_bootstrap
    from trainer.prepare import prepare_data
    from trainer.progress import log
    from trainer.ranking_baselines import RankingBaselines
    from trainer.ranking_stage import train_ranking
    from trainer.text_encoder import encode_packed

    cfg = load_config(args.config, args.set)
    started = time.time()
    data_cfg = copy.deepcopy(cfg)
    data_cfg.ranking.user_stats = True  # the baselines read the user counters whether the model does or not
    data = prepare_data(data_cfg)
    catalog, schema, vocabularies = data.catalog, data.schema, data.vocabularies
    train, test = data.split.train, data.split.test
    strategy = tf.distribute.get_strategy()
    text = build_text_assets(cfg, catalog, schema)
    cache = Path(args.text_cache) if args.text_cache else None
    if cache is not None and cache.exists() and np.load(cache).shape[0] == len(catalog):
        cached = np.load(cache)
        log(f"text embeddings of {len(cached)} ads read from {cache}")
    else:
        t0 = time.time()
        cached = encode_packed(text.adapter, text.packed_catalog)
        log(f"text encoder {cfg.encoder.preset!r}: {len(cached)} ad embeddings in {time.time() - t0:.0f}s")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, cached)

    labels, users = test[schema.click].to_numpy(), test[schema.user_id].to_numpy()
    train_labels, train_users = train[schema.click].to_numpy(), train[schema.user_id].to_numpy()
    table, arms, arm_scores = {}, {}, {}
    seeds = args.seeds
    model = None
    if not cfg.ranking.history and len(set(args.pools)) > 1:
        log("ranking.history is off: there is no history to pool, so the --pools arms train the same model")
    for pool in dict.fromkeys(args.pools):
        cfg.ranking.history_pool = pool
        name = f"DCN, history {pool.replace('_', ' ')}"
        runs, arm_scores[pool] = [], []
        for seed in seeds:  # the same seeds for every arm: seed i of one arm pairs with seed i of the other
            cfg.training.seed = seed
            tf.keras.utils.set_random_seed(seed)
            t0 = time.time()
            with tempfile.TemporaryDirectory(prefix="adrec-ranking-real-") as tmp:
                run = train_ranking(cfg, strategy, schema, vocabularies, catalog, cached, train, Path(tmp))
            pred = predict_ranking(run.model, test, schema)
            fitted = predict_ranking(run.model, train, schema)["pctr"]  # in-sample: how much the arm overfits
            m = {**_metrics(labels, pred["pctr"], users),
                 "train_auc": auc(train_labels, fitted),
                 "train_gauc": group_auc(train_labels, fitted, train_users)["gauc"],
                 "ece_uncalibrated": _metrics(labels, pred["pctr_raw"], users)["ece"],
                 "seconds": round(time.time() - t0, 1), "seed": seed, "history_pool": pool,
                 "validation": run.validation, "calibration": run.calibration}
            runs.append(m)
            arm_scores[pool].append(pred["pctr"])
            log(f"{name}, seed {seed}: AUC {m['auc']:.4f} gAUC {m['gauc']:.4f} (training rows {m['train_gauc']:.4f}) "
                f"log loss {m['logloss']:.4f} "
                f"ECE {m['ece']:.4f} (uncalibrated {m['ece_uncalibrated']:.4f}), {m['seconds']:.0f}s")
            if model is None:  # the first arm's first seed: the bootstrap against the best baseline, the export
                model, model_pred = run.model, pred
        arms[name] = runs
        table[name] = runs[0]
    first = next(iter(arms))
    runs = arms[first]
    t0 = time.time()
    baselines = RankingBaselines(schema, catalog, cfg.ranking.recent_window, cfg.ranking.validation_fraction,
                                 seeds[0]).fit(train)
    predicted = baselines.predict(test)
    log(f"baselines fitted in {time.time() - t0:.0f}s ({baselines.params})")
    for name, p in predicted.items():
        table[name] = _metrics(labels, p, users)
    best = max(predicted, key=lambda n: table[n]["gauc"])
    boot = paired_bootstrap(labels, model_pred["pctr"], predicted[best], model_pred["pctr"], predicted[best], users,
                            n_resamples=args.bootstrap, seed=0)

    reads = ", ".join(["ids", "context", "ad text (MiniLM)" if cfg.encoder.preset == "minilm" else "ad text",
                       *(["history of positives"] if cfg.ranking.history else []),
                       *(["history of non-clicks"] if cfg.ranking.negative_history else []),
                       *(["user counters"] if cfg.ranking.user_stats else []),
                       *(["ad click rates"] if cfg.ranking.item_stats else [])])
    uses = {**dict.fromkeys(arms, reads), "item rate": "ad id", "user rate": "user counters (all earlier events)",
            "user recent rate": f"user counters (last {cfg.ranking.recent_window} events)",
            "item + user recent": "ad id, user counters",
            "logistic regression": "ids, context, ad text words, user counters",
            "gradient-boosted trees": "ids and categoricals (as click rates), ad text words, user counters"}
    say(f"\n{args.config} {' '.join(args.set)}")
    say(f"{len(train)} training rows (click rate {train[schema.click].mean():.3f}), {len(test)} test rows "
        f"(click rate {labels.mean():.3f}); gAUC over {runs[0]['gauc_users']} test users with both labels; "
        f"{int((~test[schema.user_id].isin(set(train[schema.user_id]))).sum())} test rows from users unseen "
        "in training")
    say(f"  (the DCN rows: seed {seeds[0]}; over all seeds below)")
    say("\n".join(format_table(table, uses)))
    say(f"\n  over seeds {seeds} (mean +- sd; the baselines are deterministic, one fit):")
    summary = {}
    for name, arm_runs in arms.items():
        summary[name] = {key: {"mean": float(np.mean([r[key] for r in arm_runs])),
                               "sd": float(np.std([r[key] for r in arm_runs], ddof=1)) if len(arm_runs) > 1 else 0.0,
                               "per_seed": [r[key] for r in arm_runs]}
                         for key in ("auc", "gauc", "logloss", "ece", "train_gauc")}
        s = summary[name]
        say(f"  {name:34s} AUC {s['auc']['mean']:.4f}+-{s['auc']['sd']:.4f}  gAUC {s['gauc']['mean']:.4f}"
            f"+-{s['gauc']['sd']:.4f}  (gAUC per seed " + " ".join(f"{v:.4f}" for v in s["gauc"]["per_seed"])
            + f"; log loss mean {s['logloss']['mean']:.4f}, ECE mean {s['ece']['mean']:.4f}; "
            f"gAUC on its training rows {s['train_gauc']['mean']:.4f})")
        say(f"  {'':34s} gAUC - best baseline's ({best}), per seed: "
            + " ".join(f"{r['gauc'] - table[best]['gauc']:+.4f}" for r in arm_runs))
    lr = "logistic regression"
    say(f"  {lr:34s} AUC {table[lr]['auc']:.4f}          gAUC {table[lr]['gauc']:.4f}")
    comparisons = {}
    if "target_attention" in arm_scores:
        against = {"mean pooling": arm_scores.get("mean"), lr: [predicted[lr]]}
        for other, scores in against.items():
            if scores is None:
                continue
            c = bootstrap_gauc_difference(labels, arm_scores["target_attention"], scores, users,
                                          n_resamples=args.bootstrap, seed=0)
            comparisons[f"target attention - {other}"] = c
            say(f"  target attention - {other}: gAUC {c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] "
                f"(seed means over {c['runs_a']} vs {c['runs_b']} run(s); paired bootstrap over {c['groups']} "
                f"users, {c['resamples']} resamples, 95 %)")
    b = boot["gauc"]
    say(f"  {first} (seed {seeds[0]}) - best baseline by gAUC ({best}), paired bootstrap over users "
        f"({boot['resamples']} resamples, 95 %): gAUC {b['difference']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}], "
        + ", ".join(f"{name} {boot[key]['difference']:+.4f} [{boot[key]['low']:+.4f}, {boot[key]['high']:+.4f}]"
                    for key, name in (("auc", "AUC"), ("logloss", "log loss"))))
    if "ctr_check_ece_calibrated" in runs[0]["calibration"]:
        for r in (r for arm_runs in arms.values() for r in arm_runs):
            c = r["calibration"]
            say(f"  {r['history_pool']}, seed {r['seed']}: calibration ({c['method']}) fitted on "
                f"{c['ctr_rows'] - c['ctr_check_rows']} "
                f"validation rows, ECE on the latest {c['ctr_check_rows']} {c['ctr_check_ece_uncalibrated']:.4f} -> "
                f"{c['ctr_check_ece_calibrated']:.4f}: {'applied' if c['ctr_applied'] else 'not applied'}; test ECE "
                f"{r['ece_uncalibrated']:.4f} uncalibrated, {r['ece']:.4f} served; probe gAUC by epoch "
                f"{r['validation']['gauc_by_epoch']} -> {r['validation']['epochs']} epoch(s)")
    speed = None
    if args.text_cache_check:
        with tempfile.TemporaryDirectory(prefix="adrec-ranking-text-") as tmp:
            speed = text_cache_check(model, schema, catalog, text, test, args.score_rows, Path(tmp))
        say(f"  ranking SavedModel, {speed['rows']} known-ad rows through the TF1 loader: "
            f"{speed['encoder_seconds']:.2f}s encoding every row's text, {speed['cached_seconds']:.2f}s with the "
            f"text table ({speed['speedup']:.0f}x); largest score difference {speed['max_abs_difference']:.1e}")
    wall = time.time() - started
    say(f"  wall time {wall:.0f}s")
    write_report(Path(args.out), "ranking_real", config=args.config, overrides=args.set, table=table,
                 pools=list(arms), seeds=seeds, model_runs=[r for arm_runs in arms.values() for r in arm_runs],
                 arms=summary, pool_comparisons=comparisons, best_baseline=best, bootstrap=boot,
                 baseline_params=baselines.params, text_cache=speed, wall_seconds=round(wall, 1),
                 job_config=config_to_dict(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
