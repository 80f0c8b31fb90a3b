"""Every benchmark still runs (on tiny inputs): they are not in the suite otherwise, and a model
change that breaks one would go unseen until the next `make bench`."""

import json
import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CASES = {
    "training_throughput": ["--encoder", "tiny", "--ads", "200", "--batch-size", "64", "--steps", "2",
                            "--uncached-steps", "1"],
    "serving_latency": ["--ads", "300", "--requests", "20"],
    "retrieval_scaling": ["--ads", "2000", "--min-calls", "2", "--min-seconds", "0.05"],
    "ann": ["--ads", "3000", "--clusters", "30", "--queries", "64", "--nprobe", "2", "8", "--storage", "float32",
            "int8", "--min-calls", "2", "--min-seconds", "0.05"],
    "multimodal": ["--config", "configs/tiny.yaml", "--set", "data.synthetic.n_impressions=3000", "--set",
                   "data.synthetic.creative_dim=4", "--set", "data.synthetic.creative_weight=1.0", "--set",
                   "retrieval.epochs=1", "--set", "ranking.epochs=1", "--set", "ranking.validation_fraction=0.0"],
    "dp_curve": ["--config", "configs/tiny.yaml", "--set", "retrieval.loss=full_softmax", "--set",
                 "data.synthetic.n_impressions=3000", "--noise", "1", "--epochs", "1", "--delta", "1e-4"],
    "read_logs": ["--rows", "5000", "--chunk-rows", "1000"],
    "streaming": ["--rows", "6000", "--files", "3", "--piece-rows", "3000", "--users", "500",
                  "--in-memory-rows", "3000"],
    "explanations": ["--impressions", "2000", "--history-length", "5", "--batches", "2", "--calls", "2"],
    "encoder_modes": ["--quick"],
    "ranking_real": ["--config", "configs/tiny.yaml", "--set", "ranking.epochs=1", "--seeds", "1",
                     "--text-cache", "", "--score-rows", "64", "--bootstrap", "20", "--text-cache-check"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_its_report(name, tmp_path):
    out = tmp_path / f"{name}.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *CASES[name], "--out", str(out)],
                         # a bound for a hung run only: on a loaded 2-core machine a smoke can take minutes
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    # read_logs writes its own JSON (it keeps TensorFlow out of its RSS); the others name themselves.
    assert report.get("benchmark", name) == name and len(report) > 1, report


def _encoder_modes(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("encoder_modes_under_test", ROOT / "benchmarks" / "encoder_modes.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_encoder_modes_searches_the_same_number_of_rates_per_mode_and_picks_on_validation(monkeypatch):
    modes = _encoder_modes(monkeypatch)
    base = {"top_layers": (1e-5, 1e-4), "lora": (1e-3, 3e-3), "full": (1e-5, 1e-4)}
    assert modes.parse_grid(["lora=2e-4,5e-3"], base)["lora"] == (2e-4, 5e-3)
    for bad, message in [(["lora=1e-3"], "as many rates"), (["frozen=1e-3,2e-3"], "MODE=RATE"),
                         (["lora=fast,slow"], "numbers"), (["lora=0,1e-3"], "in \\(0, 1\\)"), (["lora"], "MODE=RATE")]:
        with pytest.raises(SystemExit, match=message):
            modes.parse_grid(bad, base)
    runs = [{"encoder_learning_rate": r, "validation_recall": v, "recall": t}
            for r, v, t in [(1e-3, 0.30, 0.9), (3e-3, 0.35, 0.1), (1e-2, 0.35, 0.5)]]
    # The best validation recall, not the best test recall; on a tie the earlier (lower) rate.
    assert modes.chosen(runs)["encoder_learning_rate"] == 3e-3


def test_encoder_modes_reports_each_recall_with_its_standard_error(monkeypatch):
    modes = _encoder_modes(monkeypatch)
    # Recall 0.2 over 400 clicks: sqrt(0.2 * 0.8 / 400) = 0.02; no clicks, no estimate.
    assert modes.standard_error(0.2, 400) == pytest.approx(0.02)
    assert math.isnan(modes.standard_error(0.2, 0)) and math.isnan(modes.standard_error(0.2, None))
    row = {"recall_at_k": 100, "trainable_parameters": 10, "examples_per_second": 5.0, "validation_recall": 0.3,
           "ranking_auc": 0.7, "job_seconds": 1.0, "recall_most_popular": 0.1, "test_clicks": 400,
           "validation_clicks": 40}
    lora = {**row, "mode": "lora", "encoder_learning_rate": 1e-3, "share_of_full": 0.015, "recall": 0.2}
    full = {**row, "mode": "full", "encoder_learning_rate": 1e-4, "share_of_full": 1.0, "recall": 0.2 + 0.015}
    table = "\n".join(modes.format_table("world", [lora, full], [lora, full]))
    assert "0.020" in table and "400 test clicks" in table and "validation: 40 clicks" in table
    line = modes.verdict([lora, full])
    # 0.015 below full: missed, whatever the noise, and the gap's standard error is said beside it.
    spread = math.hypot(0.02, math.sqrt(0.215 * 0.785 / 400))
    assert "-0.015" in line and f"at most {spread:.3f}" in line and "goal not met" in line


def test_encoder_modes_prints_the_tables_of_a_report_stopped_early(monkeypatch, tmp_path, capsys):
    modes = _encoder_modes(monkeypatch)
    row = {"recall_at_k": 100, "trainable_parameters": 10, "share_of_full": 0.01, "examples_per_second": 5.0,
           "ranking_auc": 0.7, "job_seconds": 1.0, "recall_most_popular": 0.1, "test_clicks": 400,
           "validation_clicks": 40}
    runs = [{**row, "mode": m, "encoder_learning_rate": r, "validation_recall": v, "recall": t}
            for m, r, v, t in [("lora", 1e-3, 0.30, 0.21), ("lora", 1e-2, 0.33, 0.20), ("full", 5e-5, 0.31, 0.25)]]
    report = {"benchmark": "encoder_modes", "modes": ["frozen", "lora", "full", "top_layers"],
              "grid": {"lora": [1e-3, 1e-2], "full": [5e-5, 2e-4], "top_layers": [5e-5, 2e-4]},
              "datasets": {"world": {"subsample": "all of it", "runs": runs}}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert modes.main(["--from-report", str(path)]) == 0
    out = capsys.readouterr().out
    # LoRA's choice is its validation best (1e-2, test 0.200); full and top_layers did not finish their grids.
    assert re.search(r"\n  lora +0\.01 .* 0\.200 ", out)
    assert "grid NOT complete: full ran 1 of its 2 rates; top_layers ran 0 of its 2 rates" in out
    assert "-0.050" in out and "goal not met" in out
    path.write_text(json.dumps({"benchmark": "quality"}))
    with pytest.raises(SystemExit):
        modes.main(["--from-report", str(path)])
    assert "not an encoder_modes report" in capsys.readouterr().err
    path.write_text(json.dumps({"benchmark": "encoder_modes", "grid": {}}))
    with pytest.raises(SystemExit):
        modes.main(["--from-report", str(path)])
    assert "missing or malformed" in capsys.readouterr().err
