"""`adrec evaluate MODEL_DIR --report OUT`: rebuilt models, metrics JSON, valid PNGs, one HTML page."""

import json
import struct
import zlib

import numpy as np
import pytest

from trainer.metrics import expected_calibration_error, reliability_bins

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) == crc, f"{path.name}: corrupt IHDR"
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path.name}: truncated"
    return struct.unpack(">II", body[:8])


def test_ece_is_zero_when_calibrated_and_measures_the_gap():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = rng.uniform(0, 1, p.size) < p
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) == pytest.approx(0.18, abs=0.02)
    assert expected_calibration_error(np.array([1, 0, 1, 0]), np.full(4, 0.9)) == pytest.approx(0.4)
    bins = reliability_bins(np.array([0, 1, 1]), np.array([0.05, 0.95, 1.0]), n_bins=10)
    assert bins["count"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]


def test_evaluate_command_rebuilds_the_job_and_writes_the_report(trained_tiny, tmp_path, capsys):
    from trainer.cli import main

    model_dir = trained_tiny.config.training.model_dir
    out = tmp_path / "report"
    assert main(["evaluate", model_dir, "--report", str(out)]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    # The rebuilt models score the held-out split as the job's own models did.
    job = trained_tiny.metrics
    assert metrics["ranking"]["auc"] == pytest.approx(job["ranking"]["auc"], abs=1e-4)
    assert metrics["ranking"]["logloss"] == pytest.approx(job["ranking"]["logloss"], abs=1e-4)
    def scores(m):  # the wall time of scoring is no metric
        return {k: v for k, v in m.items() if k != "score_seconds"}

    assert scores(metrics["retrieval"]["model"]) == pytest.approx(scores(job["retrieval"]["model"]), abs=1e-3)
    assert 0.0 <= metrics["ranking"]["ece"] < 0.2

    page = (out / "index.html").read_text()
    for name in ("recall_at_k.png", "reliability.png", "score_distributions.png", "training_curves.png"):
        width, height = png_size(out / name)
        assert width >= 300 and height >= 300, name
        assert f"src='{name}'" in page
    assert "ece" in page and "most_popular recall@10" in page


def test_evaluate_refuses_a_directory_that_is_no_job(tmp_path, capsys):
    from trainer.cli import main

    assert main(["evaluate", str(tmp_path), "--report", str(tmp_path / "out")]) == 1
    assert "not a finished training job" in capsys.readouterr().err
