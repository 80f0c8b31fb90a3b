"""Retrieval training examples/s: cached vs uncached ad text, fp32 vs mixed_bfloat16, in one run.

Builds the job's real retrieval model (same data, tokenizer, packer and BERT as `adrec train`)
on a synthetic world and times `fit()` over the same batches for each case:

- `cached`: the frozen encoder ran once per catalog ad; training gathers the cached embeddings
  (what `encoder.mode: frozen` does);
- `uncached`: the same frozen encoder runs on every training batch's ad texts (the
  `encoder.mode: full` model graph with BERT's weights held fixed);
- `fine-tuned`: `encoder.mode: full`, BERT trained too (with `--fine-tune`);
- `top-2 layers`: `encoder.mode: top_layers`, the last two transformer layers trained (with `--fine-tune`);

each under `training.mixed_precision: none` (fp32) and `mixed_bfloat16` (the rows that train
BERT: fp32 and `mixed_bfloat16 + BERT` only). The job's
mixed_bfloat16 sets the tf_keras policy, which covers the towers; the keras-hub (Keras 3) BERT
has its own policy, so `mixed_bfloat16 + BERT` also sets that one. The one-off cost of the
cache (encoding every catalog ad) is printed beside it.

    .venv/bin/python benchmarks/training_throughput.py --encoder minilm --out runs/bench/training_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": ("float32", "float32"), "mixed_bfloat16": ("mixed_bfloat16", "float32"),
              "mixed_bfloat16 + BERT": ("mixed_bfloat16", "mixed_bfloat16")}


def job_config(encoder: str, n_ads: int, batch_size: int):
    from features.synthetic import SyntheticConfig
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / ("demo.yaml" if encoder == "minilm" else "tiny.yaml"))
    cfg.encoder.preset = encoder
    cfg.data.synthetic = SyntheticConfig(n_users=2000, n_advertisers=max(30, n_ads // 20), n_ads=n_ads,
                                         n_impressions=60000)
    cfg.retrieval.batch_size = batch_size
    return cfg


def set_policies(precision: str) -> None:
    tf_keras_policy, keras3_policy = PRECISIONS[precision]
    tf.keras.mixed_precision.set_global_policy(tf_keras_policy)
    keras.config.set_dtype_policy(keras3_policy)


def run_case(cfg, data, path: str, precision: str, steps: int, warmup: int) -> dict:
    """Build the retrieval model for one case and time fit() over `steps` batches."""
    from trainer.builders import build_retrieval, build_text_assets
    from trainer.fit import build_model
    from trainer.inputs import retrieval_dataset
    from trainer.prepare import sampling_counts
    from trainer.text_encoder import encode_packed

    catalog, rows, schema, vocab = data
    cfg = copy.deepcopy(cfg)
    cfg.encoder.mode = {"fine-tuned": "full", "top-2 layers": "top_layers"}.get(path, "frozen")
    cfg.encoder.trainable_layers = 2
    strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(0)
    set_policies(precision)
    try:
        text = build_text_assets(cfg, catalog, schema)  # frozen: the adapter exposes no trainable BERT weights
        cache_s, cached = None, None
        if path == "cached":
            t0 = time.perf_counter()
            cached = encode_packed(text.adapter, text.packed_catalog)
            cache_s = time.perf_counter() - t0
        elif path == "uncached":
            cfg.encoder.mode = "full"  # CatalogText runs the encoder per batch; its weights stay untrained
        model = build_retrieval(cfg, strategy, schema, vocab, catalog, text, cached,
                                sampling_counts(rows, schema))
        ds = retrieval_dataset(rows, cfg, schema)[0].repeat()
        build_model(model, next(iter(ds)), strategy)
        model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)  # trace and warm up
        t0 = time.perf_counter()
        history = model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
        seconds = time.perf_counter() - t0
    finally:
        set_policies("fp32")
    trainable = sum(int(tf.size(w)) for w in model.trainable_weights)
    return {"path": path, "precision": precision, "steps": steps, "batch_size": cfg.retrieval.batch_size,
            "seconds": seconds, "examples_per_s": steps * cfg.retrieval.batch_size / seconds,
            "cache_build_s": cache_s, "catalog_ads": len(catalog), "trainable_params": trainable,
            "final_loss": float(history.history["loss"][-1])}


def load(cfg):
    """The job's training rows (catalog columns and per-event histories joined) and vocabularies,
    as `adrec train` has them."""
    from trainer.prepare import prepare_data

    data = prepare_data(cfg)
    catalog, schema, split, vocab = data.catalog, data.schema, data.split, data.vocabularies
    return catalog, split.train, schema, vocab


def table(results: list[dict]) -> str:
    """One line per case; `cached fp32 is x` is the cached fp32 case's examples/s over this case's."""
    base = next((r["examples_per_s"] for r in results if r["path"] == "cached" and r["precision"] == "fp32"), None)
    lines = [f"{'ad text':12s} {'precision':22s} {'examples/s':>11} {'cached fp32 is x':>17} {'cache build s':>14}"]
    for r in results:
        ratio = base / r["examples_per_s"] if base else float("nan")
        cache = f"{r['cache_build_s']:.1f}" if r["cache_build_s"] is not None else "-"
        lines.append(f"{r['path']:12s} {r['precision']:22s} {r['examples_per_s']:11.0f} {ratio:17.1f} {cache:>14}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm", help="minilm (bundled, realistic) or tiny (random 2x64 BERT)")
    parser.add_argument("--ads", type=int, default=800, help="catalog size (the demo's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="timed steps for the cached cases")
    parser.add_argument("--uncached-steps", type=int, default=6, help="timed steps when BERT runs per batch")
    parser.add_argument("--fine-tune", action="store_true", help="also time encoder.mode top_layers and full")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "training_throughput.json")
    args = parser.parse_args(argv)
    cfg = job_config(args.encoder, args.ads, args.batch_size)
    data = load(cfg)
    paths = ["cached", "uncached"] + (["top-2 layers", "fine-tuned"] if args.fine_tune else [])
    results = []
    for path in paths:
        for precision in PRECISIONS:
            if path == "cached" and precision == "mixed_bfloat16 + BERT":
                continue  # BERT is not in the cached training step
            if path in ("top-2 layers", "fine-tuned") and precision == "mixed_bfloat16":
                continue  # the towers' policy alone leaves the trained BERT in fp32: the uncached row shows it
            steps = args.steps if path == "cached" else args.uncached_steps
            row = run_case(cfg, data, path, precision, steps, warmup=2 if path == "cached" else 1)
            results.append(row)
            print(f"[bench] {path:10s} {precision:22s} {row['examples_per_s']:8.0f} examples/s "
                  f"({steps} steps of {args.batch_size} in {row['seconds']:.1f}s)", flush=True)
    write_report(args.out, "training_throughput", encoder=args.encoder,
                 sequence_length=cfg.encoder.sequence_length, results=results)
    print()
    print(f"retrieval training, encoder {args.encoder!r}, {args.ads} ads, batch {args.batch_size}")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
