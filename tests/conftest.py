import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, **overrides):
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.training.model_dir = str(tmp / "run")
    cfg.export.export_dir = str(tmp / "models")
    for section, values in overrides.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    from trainer.job import run_training

    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    return run_training(cfg, progress=False)


@pytest.fixture(scope="session")
def exported_tiny(trained_tiny):
    from trainer.export import export_all

    return export_all(trained_tiny, trained_tiny.config.export.export_dir)
