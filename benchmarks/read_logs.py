"""Read + validate a generated 1,000,000-row CSV impression log through a data spec.

Prints rows/s and the process's peak RSS (the budget is 2 GB) and writes a JSON result.
The log is written in 100k-row pieces first, so generating it does not raise the peak;
1 % of its rows are corrupted (five reasons) so validation does real work.

    .venv/bin/python benchmarks/read_logs.py [--rows 1000000] [--out runs/benchmarks/read_logs.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.loader import load_dataset  # noqa: E402
from features.spec import spec_from_dict  # noqa: E402

RSS_BUDGET_MB = 2048


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def write_inputs(root: Path, rows: int, n_ads: int = 20_000, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    catalog = pd.DataFrame({"ad_id": [f"ad{i:06d}" for i in range(n_ads)],
                            "advertiser": [f"adv{i % 900:04d}" for i in range(n_ads)],
                            "title": [f"Offer {i} on running shoes and city breaks" for i in range(n_ads)],
                            "bid": np.round(rng.lognormal(0, 0.5, n_ads), 3)})
    catalog.to_csv(root / "catalog.csv", index=False)
    bad_total = 0
    piece = 100_000
    with open(root / "logs.csv", "w") as out:
        for start in range(0, rows, piece):
            n = min(piece, rows - start)
            frame = pd.DataFrame({
                "user": [f"u{u:07d}" for u in rng.integers(0, 200_000, n)],
                "ad": [f"ad{a:06d}" for a in rng.integers(0, n_ads, n)],
                "ts": (1_700_000_000 + start + np.arange(n)).astype(str),
                "device": rng.choice(["mobile", "desktop", "tablet"], n),
                "slot": rng.integers(1, 6, n).astype(str),
                "clicked": (rng.random(n) < 0.05).astype(int).astype(str),
            })
            bad = rng.choice(n, size=n // 100, replace=False)
            for j, col, value in ((0, "user", ""), (1, "ts", "not-a-time"), (2, "clicked", "3"),
                                  (3, "slot", "top"), (4, "ad", "ghost")):
                frame.loc[frame.index[bad[j::5]], col] = value
            bad_total += len(bad)
            frame.to_csv(out, index=False, header=start == 0)
    return bad_total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=200_000)
    parser.add_argument("--out", default="runs/benchmarks/read_logs.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        bad = write_inputs(root, args.rows)
        gen_s = time.perf_counter() - t0
        size_mb = (root / "logs.csv").stat().st_size / 2**20
        rss_before = peak_rss_mb()
        spec = spec_from_dict({
            "name": "bench", "logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]},
            "chunk_rows": args.chunk_rows,
            "columns": {"user_id": "user", "ad_id": "ad", "catalog_ad_id": "ad_id", "timestamp": "ts",
                        "labels": {"click": "clicked"},
                        "context_categoricals": ["device"], "position": "slot", "ad_categoricals": ["advertiser"],
                        "ad_text": ["title"], "bid": "bid"},
            "derive_time_context": True}, base_dir=root)
        t0 = time.perf_counter()
        data = load_dataset(spec)
        read_s = time.perf_counter() - t0
        frame_mb = data.logs.memory_usage(deep=True).sum() / 2**20
    peak = peak_rss_mb()
    result = {
        "rows": args.rows, "file_mb": round(size_mb, 1), "chunk_rows": args.chunk_rows,
        "seconds": round(read_s, 2), "rows_per_s": round(args.rows / read_s),
        "kept": data.report.logs.kept, "skipped": dict(data.report.logs.skipped), "corrupted": bad,
        "peak_rss_mb": round(peak, 1), "rss_before_read_mb": round(rss_before, 1),
        "kept_frame_mb": round(frame_mb, 1), "rss_budget_mb": RSS_BUDGET_MB,
        "under_budget": peak < RSS_BUDGET_MB, "generate_seconds": round(gen_s, 1),
        "python": platform.python_version(), "pandas": pd.__version__, "machine": platform.machine(),
    }
    print(data.report.format())
    print(f"read + validated {args.rows:,d} rows ({size_mb:.0f} MB CSV) in {read_s:.1f}s: "
          f"{result['rows_per_s']:,d} rows/s; peak RSS {peak:.0f} MB "
          f"({'under' if result['under_budget'] else 'OVER'} the {RSS_BUDGET_MB} MB budget); "
          f"kept frame {frame_mb:.0f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if result["kept"] == args.rows - bad else 1


if __name__ == "__main__":
    sys.exit(main())
