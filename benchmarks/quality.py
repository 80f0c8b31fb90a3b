"""Retrieval quality against strong baselines under three standard protocols, in one run (`make quality`).

For each protocol config (default: configs/quality/{time,random,leave_last_out}.yaml, all on
ml-latest-small with every rating a positive) this trains the two-tower model with `adrec train`'s code
path (retrieval only, no export) and fits every baseline of `evaluation.baselines` on exactly the same
training positives; all methods answer the same held-out queries with the same histories and the same
exclusions, and choose their hyperparameters (the model: its epoch count) on the same validation split
carved from the training rows. Prints one table (Recall@10, Recall@100, NDCG@10 overall and per slice),
writes the metrics as JSON, and with `--docs` rewrites docs/evaluation.md's quality table from this run.

    .venv/bin/python benchmarks/quality.py                              # all three protocols
    .venv/bin/python benchmarks/quality.py --protocols random --set retrieval.epochs=4

With `--jobs N` (default: one per protocol) the protocols train in N processes at once. Each method
keeps about one core busy (the model a little more, the baselines' epochs less: small ops and
NumPy), so on a 2-core machine running them side by side fills both cores instead of leaving one
idle. The catalog's frozen text embeddings are computed first, once, into `encoder.cache_dir`, which
the protocols share. Every protocol's result is the same as when run alone: the processes share no
state but that cache and the pseudonymisation key beside their model dirs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_report import write_report

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTOCOLS = ("time", "random", "leave_last_out")
METHODS = (("adrec two-tower", "model"), ("EASE", "ease"), ("ItemKNN", "itemknn"), ("SASRec", "sasrec"),
           ("ID-only two-tower (TFRS)", "id_only"), ("most-popular", "most_popular"))
SLICES = (("all", ""), ("warm ads", "_warm"), ("cold-start ads", "_cold"), ("seen users", "_seen_users"),
          ("unseen users", "_unseen_users"))
COLUMNS = (("R@10", "recall@10"), ("R@100", "recall@100"), ("N@10", "ndcg@10"))
# Per user, where each user's queries share one ranked list: the columns of published random-split results.
USER_COLUMNS = (("R@20", "user_recall@20"), ("R@50", "user_recall@50"), ("N@100", "user_ndcg@100"))
README_START, README_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"
SUMMARY_START, SUMMARY_END = "<!-- quality-summary:start -->", "<!-- quality-summary:end -->"


def describe(protocol: dict) -> str:
    what = {"time": f"time cutoff, last {protocol['test_fraction']:.0%} held out",
            "random": f"seeded random {protocol['test_fraction']:.0%} held out (seed {protocol['seed']})",
            "leave_last_out": f"each user's last {protocol['n_last']} positive(s) held out",
            "column": f"split column {protocol['split_column']!r}"}[protocol["protocol"]]
    return (f"{what}; history: {protocol['history_at_test']}"
            + ("; seen ads excluded" if protocol["exclude_seen"] else ""))


def slices_of(r: dict) -> list[tuple[str, str]]:
    """The slices that hold queries (e.g. a random split has no cold-start ads)."""
    return [(label, suffix) for label, suffix in SLICES if r.get("model" + suffix, {}).get("queries", 0) > 0]


def format_table(results: dict[str, dict]) -> str:
    lines = []
    for name, r in results.items():
        slices = slices_of(r)
        lines.append(f"{name}: {describe(r['protocol'])}; {r['test_positives']:,d} held-out positives "
                     f"({r['cold_test_positives']:,d} on cold-start ads, {r['unseen_user_test_positives']:,d} from "
                     f"users unseen in training), catalog {r['catalog_size']:,d}")
        lines.append(f"  {'':26s}" + "".join(f"{label:>21s}" for label, _ in slices))
        lines.append(f"  {'':26s}" + "".join(f"{c:>7s}" for _ in slices for c, _ in COLUMNS))
        for label, key in METHODS:
            if key not in r:
                continue
            cells = "".join(f"{r[key + suffix][m]:7.3f}" for _, suffix in slices for _, m in COLUMNS)
            lines.append(f"  {label:26s}{cells}")
        if all(m in r["model"] for _, m in USER_COLUMNS):
            lines.append("  per user (hits / min(K, held-out items of the user), averaged over users):")
            lines.append(f"  {'':26s}" + "".join(f"{c:>7s}" for c, _ in USER_COLUMNS))
            for label, key in METHODS:
                if key in r:
                    lines.append(f"  {label:26s}" + "".join(f"{r[key][m]:7.3f}" for _, m in USER_COLUMNS))
        validation = validation_recalls(r)
        if validation:
            lines.append("  validation split (what settings were chosen on), Recall@100: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in validation.items()))
        lines += ["  against the best baseline of each metric:", *(f"  {v}" for v in verdict({name: r})), ""]
    return "\n".join(lines)


def validation_recalls(r: dict) -> dict[str, float]:
    """Recall@100 on the validation split: the model's, and each baseline's chosen candidate's."""
    out = {}
    if "model_validation" in r:
        out["model"] = r["model_validation"]["recall@100"]
    for name, report in r.get("baseline_selection", {}).items():
        chosen = [c for c in report.get("candidates", []) if c["params"] == report.get("chosen")]
        if chosen:
            out[name] = chosen[0]["validation"]["recall@100"]
    return out


def markdown_table(results: dict[str, dict]) -> str:
    rows = ["| protocol | method | Recall@10 | Recall@100 | NDCG@10 | cold-start ads R@100 | unseen users R@100 "
            "| per user R@20 / R@50 / NDCG@100 |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for label, key in METHODS:
            if key not in r:
                continue
            m = r[key]
            cold, unseen = (_slice_recall(r, key + suffix) for suffix in ("_cold", "_unseen_users"))
            bold = "**" if key == "model" else ""
            per_user = (" / ".join(f"{m[c]:.3f}" for _, c in USER_COLUMNS)
                        if all(c in m for _, c in USER_COLUMNS) else "–")
            rows.append(f"| {name} | {bold}{label}{bold} | {m['recall@10']:.3f} | {m['recall@100']:.3f} | "
                        f"{m['ndcg@10']:.3f} | {cold} | {unseen} | {per_user} |")
    return "\n".join(rows)


ID_BASED = ("itemknn", "ease", "id_only", "sasrec")  # read item ids only: cold-start ads are out of their reach


def verdict(results: dict[str, dict]) -> list[str]:
    """The goal checked on this run, one line per protocol: the model against the best baseline of each
    headline metric (at or above it, or which baseline wins and by how much), and on cold-start ads
    against the best ID-based baseline."""
    lines = []
    for name, r in results.items():
        baselines = [k for _, k in METHODS if k in r and k != "model"]  # most-popular is always there
        parts = []
        for label, metric in (("Recall@100", "recall@100"), ("NDCG@10", "ndcg@10")):
            best = max(baselines, key=lambda k: r[k][metric])
            ours, theirs = r["model"][metric], r[best][metric]
            parts.append(f"{label} {ours:.3f} {'>=' if ours >= theirs else '<'} {best} {theirs:.3f} "
                         f"({ours / theirs:.2f}x)" if theirs > 0 else f"{label} {ours:.3f} (baselines 0)")
        cold = r.get("model_cold", {})
        if cold.get("queries", 0):
            best_id = max((r[k + "_cold"]["recall@100"] for k in baselines if k in ID_BASED), default=0.0)
            parts.append(f"cold-start ads Recall@100 {cold['recall@100']:.3f} against {best_id:.3f} for the best "
                         f"ID-based baseline ({cold['queries']} queries)")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    return lines


def _slice_recall(r: dict, key: str) -> str:
    s = r.get(key, {})
    return f"{s['recall@100']:.3f}" if s.get("queries", 0) else "–"


def update_docs(readme: Path, table: str, note: str, start: str = README_START, end: str = README_END) -> None:
    """Replace what lies between the `start` and `end` markers of `readme` with the note and the table."""
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {start} ... {end} section to update")
    body = f"{note}\n\n{table}" if table else note
    readme.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text))


def prepare_shared(config: Path, overrides: list[str]) -> None:
    """What every protocol reads and none should compute alone: the pseudonymisation key beside the
    model dirs and, for a frozen encoder with `encoder.cache_dir`, the catalog's text embeddings."""
    from trainer.builders import build_text_assets
    from trainer.config import load_config
    from trainer.prepare import prepare_data
    from trainer.progress import log
    from trainer.text_encoder import encode_cached

    cfg = load_config(config, overrides)
    data = prepare_data(cfg, None, None, with_negatives=False)
    if cfg.encoder.mode == "frozen" and cfg.encoder.cache_dir:
        t0 = time.time()
        text = build_text_assets(cfg, data.catalog, data.schema, progress=True)
        encode_cached(text.adapter, text.packed_catalog, cfg.encoder.cache_dir, progress=True)
        log(f"catalog text embeddings ready in {cfg.encoder.cache_dir} ({time.time() - t0:.0f}s)")


def run_here(names: list[str], config_dir: Path, overrides: list[str], quiet: bool) -> tuple[dict, dict]:
    """Train and evaluate each protocol in this process, one after the other."""
    from trainer.config import load_config
    from trainer.job import run_training
    from trainer.progress import stdout_to_stderr

    results, walls = {}, {}
    for name in names:
        cfg = load_config(config_dir / f"{name}.yaml", overrides)
        t0 = time.time()
        with stdout_to_stderr():  # Keras' epoch lines are logs; stdout holds the table alone
            trained = run_training(cfg, progress=not quiet, with_ranking=False)
        walls[name] = round(time.time() - t0, 1)
        results[name] = trained.metrics["retrieval"]
        print(format_table({name: results[name]}), file=sys.stderr, flush=True)
    return results, walls


def _relay(stream, prefix: str) -> None:
    for line in stream:
        sys.stderr.write(f"{prefix}{line}")
        sys.stderr.flush()


def _child(args: list[str], prefix: str, threads: int = 0) -> subprocess.Popen:
    """This script again with `args`; with `threads`, TensorFlow and the BLAS under NumPy use that many."""
    env = dict(os.environ)
    if threads:
        args = [*args, "--threads", str(threads)]
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace", env=env)
    threading.Thread(target=_relay, args=(proc.stderr, prefix), daemon=True).start()
    return proc


def run_parallel(names: list[str], jobs: int, config_dir: Path, overrides: list[str], quiet: bool
                 ) -> tuple[dict, dict]:
    """Each protocol in its own process, `jobs` at a time, after one process has prepared what they share.

    Each process gets its share of the cores as threads (at least one): left to themselves, TensorFlow
    and BLAS each start a thread per core in every process, and the processes' threads then spend CPU
    time waiting on each other for the same work (docs/evaluation.md#retrieval-quality)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    sets = [a for o in overrides for a in ("--set", o)]
    common = ["--config-dir", str(config_dir), *sets, *(["--quiet"] if quiet else [])]
    prep = _child(["--prepare-only", "--protocols", names[0], *common], "[prepare] ")
    if prep.wait() != 0:
        raise SystemExit(f"preparing the shared inputs failed (exit {prep.returncode}); its log is above")
    results, walls = {}, {}
    with tempfile.TemporaryDirectory(prefix="adrec-quality-") as tmp:
        pending, running = list(names), {}
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                out = Path(tmp) / f"{name}.json"
                running[name] = (_child(["--protocols", name, "--jobs", "1", "--out", str(out), *common],
                                        f"[{name}] ", threads), out)
            time.sleep(1.0)
            for name, (proc, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0:
                    for other, _ in running.values():
                        other.kill()
                    raise SystemExit(f"protocol {name} failed (exit {proc.returncode}); its log is above")
                report = json.loads(out.read_text())
                results[name], walls[name] = report["results"][name], report["protocol_seconds"][name]
    return {n: results[n] for n in names}, {n: walls[n] for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--config-dir", default=str(ROOT / "configs" / "quality"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value of every protocol (repeatable)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="protocols trained at once, each in its own process (default: all of them)")
    parser.add_argument("--out", default="runs/bench/quality.json")
    parser.add_argument("--docs", action="store_true", help="rewrite docs/evaluation.md's quality table from this run")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # set by run_parallel
    args = parser.parse_args(argv)
    if args.threads > 0:  # before TensorFlow runs anything: the thread pools are fixed at its first op
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.jobs < 0:
        parser.error(f"--jobs: expected 0 (one per protocol) or more, got {args.jobs}")
    config_dir = Path(args.config_dir)
    if args.prepare_only:
        prepare_shared(config_dir / f"{args.protocols[0]}.yaml", args.set)
        return 0

    from trainer.config import config_to_dict, load_config

    jobs = min(args.jobs or len(args.protocols), len(args.protocols))
    started = time.time()
    if jobs > 1:
        results, walls = run_parallel(args.protocols, jobs, config_dir, args.set, args.quiet)
    else:
        results, walls = run_here(args.protocols, config_dir, args.set, args.quiet)
    wall = time.time() - started
    how = f"{jobs} protocols at once" if jobs > 1 else "one protocol at a time"
    print(format_table(results))
    print(f"wall time {wall / 60:.1f} min, {how} (" + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + ")")
    write_report(Path(args.out), "quality", protocols=args.protocols, overrides=args.set, jobs=jobs,
                 wall_seconds=round(wall, 1), protocol_seconds=walls, results=results,
                 job_configs={n: config_to_dict(load_config(config_dir / f"{n}.yaml", args.set))
                              for n in args.protocols})
    if args.docs:
        note = (f"Generated by `make quality` on {time.strftime('%Y-%m-%d')} ({', '.join(args.protocols)}; "
                f"{wall / 60:.0f} min on this machine, {os.cpu_count()} CPU cores, {how}). "
                "Every rating of ml-latest-small is a positive; per held-out positive, the rank of its movie "
                "over the whole catalog, the user's known positives excluded; R@100 of cold-start ads and of "
                "users unseen in training where the protocol has them; per-user columns where each user's "
                "queries share one ranked list. Against the best baseline of each metric:\n\n"
                + "\n".join(verdict(results)))
        update_docs(ROOT / "docs" / "evaluation.md", markdown_table(results), note)
        summary = (f"`make quality` on {time.strftime('%Y-%m-%d')} ({wall / 60:.0f} min on {os.cpu_count()} CPU "
                   "cores), ml-latest-small, every rating a positive, ranked over the whole catalog with the "
                   "user's known positives excluded; the model against the best baseline of each metric "
                   "(EASE, ItemKNN, SASRec, the TFRS ID-only two-tower, most-popular; all given the same "
                   "histories, training rows and exclusions):\n\n" + "\n".join(verdict(results))
                   + "\n\nEvery method, slice and protocol: "
                   "[docs/evaluation.md](docs/evaluation.md#retrieval-quality).")
        update_docs(ROOT / "README.md", "", summary, SUMMARY_START, SUMMARY_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
