"""What the explanation outputs cost a served request: the recommender and ranking SavedModels with and
without them (trainer/explain.py), loaded the TF1 way as TF Serving loads them, on the same requests.

It trains one tiny-BERT job whose ranking reads the history with target attention
(`--history-length` N entries, every request's history full), saves each servable twice
(`explanations=True` / `False`) and times `session.run` per batch size: p50 and p90 in ms over
`--calls` calls after a warm-up. Prints a table and writes JSON.

    .venv/bin/python benchmarks/explanations.py --out runs/bench/explanations.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_report import write_report  # first: it quiets TensorFlow before it loads

ROOT = Path(__file__).resolve().parents[1]

import tensorflow as tf  # noqa: E402


def train(workdir: Path, impressions: int, history_length: int):
    from trainer.config import load_config
    from trainer.job import run_training

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.data.synthetic = cfg.data.synthetic.model_copy(update={"n_impressions": impressions})
    cfg.retrieval = cfg.retrieval.model_copy(update={"epochs": 1, "history_length": history_length})
    cfg.ranking = cfg.ranking.model_copy(update={"epochs": 1, "history": True, "history_pool": "target_attention"})
    cfg.evaluation.baselines = ()
    cfg.training.model_dir = str(workdir / "run")
    cfg.export.export_dir = str(workdir / "models")
    return run_training(cfg, progress=False)


def requests(trained, batch: int, model: str) -> dict[str, np.ndarray]:
    """`batch` test rows as the model's inputs, each history filled to its width with catalog ads."""
    from features.history import HISTORY
    from trainer.inputs import query_inputs
    from trainer.serving_artifacts import as_numpy_features

    schema, ranking = trained.schema, trained.ranking
    rows = trained.split.test.sample(batch, replace=True, random_state=0).reset_index(drop=True)
    ads = trained.catalog[schema.ad_id].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    rows[HISTORY] = [rng.choice(ads, ranking.history_length, replace=False).astype(object) for _ in range(batch)]
    if model == "ranking":
        text = trained.catalog[[schema.ad_id, *schema.ad_text]]
        rows = rows.drop(columns=[c for c in schema.ad_text if c in rows]).merge(text, on=schema.ad_id, how="left")
        names = (*schema.query_features, *ranking.user_inputs, *schema.ad_string_features, *schema.ad_text)
        return as_numpy_features(rows, names, schema)
    names = tuple(dict.fromkeys((*query_inputs(schema, trained.config.retrieval.history_length),
                                 *ranking.user_inputs)))
    return {**as_numpy_features(rows, names, schema), "excluded_ad_ids": np.full((batch, 1), "", dtype=object)}


def timed(path: Path, feeds: dict, calls: int) -> tuple[float, float]:
    import tensorflow_text  # noqa: F401  (the ranking graph's TF Text ops)

    session = tf.compat.v1.Session(graph=tf.Graph())
    sig = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path)).signature_def["serving_default"]
    fetches = {k: v.name for k, v in sig.outputs.items()}
    feed = {sig.inputs[k].name: v for k, v in feeds.items()}
    for _ in range(3):
        session.run(fetches, feed)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(fetches, feed)
        times.append((time.perf_counter() - start) * 1000)
    session.close()
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def main(argv=None) -> int:
    from trainer.explain import reference_input
    from trainer.servables import RankingServable, RecommenderServable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=20000)
    parser.add_argument("--history-length", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "explanations.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adrec-bench-explain-") as tmp:
        workdir = Path(tmp)
        trained = train(workdir, args.impressions, args.history_length)
        trained.ranking.interact.jit = False  # as export serves it
        trained.retrieval.set_jit(False)
        reference = reference_input(trained.ranking, trained.split.train, trained.schema)
        cfg = trained.config.export
        paths = {}
        for explained in (False, True):
            modules = {"recommender": RecommenderServable(trained, cfg.retrieve_n, cfg.recommend_k, cfg.objective,
                                                          reference=reference, explanations=explained),
                       "ranking": RankingServable(trained.ranking, trained.schema, trained.text, reference=reference,
                                                  explanations=explained)}
            for name, module in modules.items():
                paths[name, explained] = workdir / f"{name}-{explained}"
                tf.saved_model.save(module, str(paths[name, explained]), signatures={"serving_default": module.serve})
        results = []
        for name in ("recommender", "ranking"):
            for batch in args.batches:
                feeds = requests(trained, batch, name)
                plain, explained = (timed(paths[name, e], feeds, args.calls) for e in (False, True))
                results.append({"model": name, "batch": batch, "p50_ms": plain[0], "p90_ms": plain[1],
                                "explained_p50_ms": explained[0], "explained_p90_ms": explained[1]})
    write_report(args.out, "explanations", history_length=args.history_length, calls=args.calls,
                 retrieve_n=cfg.retrieve_n, recommend_k=cfg.recommend_k, results=results)
    print(f"{'model':12s} {'batch':>5}  {'p50 ms':>8} {'+explain':>9} {'ratio':>6}  {'p90 ms':>8} {'+explain':>9}")
    for r in results:
        print(f"{r['model']:12s} {r['batch']:>5}  {r['p50_ms']:8.2f} {r['explained_p50_ms']:9.2f} "
              f"{r['explained_p50_ms'] / r['p50_ms']:6.2f}  {r['p90_ms']:8.2f} {r['explained_p90_ms']:9.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
