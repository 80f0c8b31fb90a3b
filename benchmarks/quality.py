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
"""

from __future__ import annotations

import argparse
import os
import re
import sys
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


def update_docs(readme: Path, table: str, note: str) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {README_START} ... {README_END} section to update")
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{note}\n\n{table}\n{README_END}", text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--config-dir", default=str(ROOT / "configs" / "quality"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value of every protocol (repeatable)")
    parser.add_argument("--out", default="runs/bench/quality.json")
    parser.add_argument("--docs", action="store_true", help="rewrite docs/evaluation.md's quality table from this run")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from trainer.config import config_to_dict, load_config
    from trainer.job import run_training
    from trainer.progress import stdout_to_stderr

    results, walls = {}, {}
    started = time.time()
    for name in args.protocols:
        cfg = load_config(Path(args.config_dir) / f"{name}.yaml", args.set)
        t0 = time.time()
        with stdout_to_stderr():  # Keras' epoch lines are logs; stdout holds the table alone
            trained = run_training(cfg, progress=not args.quiet, with_ranking=False)
        walls[name] = round(time.time() - t0, 1)
        results[name] = trained.metrics["retrieval"]
        print(format_table({name: results[name]}), file=sys.stderr, flush=True)
    wall = time.time() - started
    print(format_table(results))
    print(f"wall time {wall / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + ")")
    write_report(Path(args.out), "quality", protocols=args.protocols, overrides=args.set,
                 wall_seconds=round(wall, 1), protocol_seconds=walls, results=results,
                 job_configs={n: config_to_dict(load_config(Path(args.config_dir) / f"{n}.yaml", args.set))
                              for n in args.protocols})
    if args.docs:
        note = (f"Generated by `make quality` on {time.strftime('%Y-%m-%d')} ({', '.join(args.protocols)}; "
                f"{wall / 60:.0f} min on this machine, {os.cpu_count()} CPU cores). "
                "Every rating of ml-latest-small is a positive; per held-out positive, the rank of its movie "
                "over the whole catalog, the user's known positives excluded; R@100 of cold-start ads and of "
                "users unseen in training where the protocol has them; per-user columns where each user's "
                "queries share one ranked list. Against the best baseline of each metric:\n\n"
                + "\n".join(verdict(results)))
        update_docs(ROOT / "docs" / "evaluation.md", markdown_table(results), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
