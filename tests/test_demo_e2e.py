"""The slow end-to-end path with the pretrained MiniLM: train -> export -> serve (child process) -> recommend."""

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_demo_with_pretrained_minilm(tmp_path, capsys):
    from trainer.config import load_config
    from trainer.demo import run_demo

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    cfg.data.synthetic = type(cfg.data.synthetic)(n_users=800, n_ads=400, n_impressions=50000)
    cfg.training.model_dir = str(tmp_path / "run")
    cfg.export.export_dir = str(tmp_path / "models")
    result = run_demo(cfg, n_users=3, k=5, progress=False)
    captured = capsys.readouterr()
    printed, logged = captured.out, captured.err
    assert cfg.encoder.preset == "minilm"
    assert len(result["recommendations"]) == 3
    assert all(len(ads) == 5 for ads in result["recommendations"].values())
    for user_id, ads in result["recommendations"].items():  # the shown ads never come back
        assert len(result["next_pages"][user_id]) == 5 and not set(ads["ad_id"]) & set(result["next_pages"][user_id])
    r = result["metrics"]["retrieval"]
    assert r["model"]["recall@100"] > r["most_popular"]["recall@100"]
    assert r["model_cold"]["recall@100"] > 0.1  # cold ads are reachable only through their text
    assert 0.5 < result["metrics"]["ranking"]["auc"] <= 1.0
    assert r["model_cold"]["recall@100"] >= 3 * r["id_only_cold"]["recall@100"]
    assert "beats most-popular" in printed and "marked as shown" in printed
    assert "server stopped" in logged and "server stopped" not in printed  # logs go to stderr
