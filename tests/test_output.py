"""Output discipline: results alone on stdout, logs and progress on stderr, no warnings on a clean run,
no TensorFlow banners, `adrec --help` without TensorFlow, and layers that define `get_config`."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT

HEAVY = ("tensorflow", "tf_keras", "keras", "keras_hub", "keras_nlp", "tensorflow_recommenders", "tensorflow_text")


def _clean_env(**extra) -> dict:
    """The user's environment without the test suite's TensorFlow settings: what a terminal has."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS",
                                                           "KERAS_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def test_help_parses_without_tensorflow():
    """Every command's help is built, and printed, without importing TensorFlow, Keras or pandas."""
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from trainer.cli import build_parser
        for argv in ([], ["demo"], ["train"], ["evaluate"], ["recommend"], ["data"], ["data", "synthetic"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                build_parser().parse_args([*argv, "--help"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY + ("pandas",)!r})
        assert not heavy, heavy
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=_clean_env())
    assert run.returncode == 0 and run.stdout == "ok\n", run.stdout + run.stderr
    run = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=_clean_env())
    assert run.returncode == 0 and run.stdout.startswith("usage: adrec") and run.stderr == ""
    assert "TF_CPP_MIN_LOG_LEVEL=0" in run.stdout  # the way back to TensorFlow's own logs is documented


def test_serve_help_is_the_servers():
    run = subprocess.run([sys.executable, "-m", "trainer.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=_clean_env())
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: adrec serve") and "--model-config-file" in run.stdout
    assert run.stderr == ""  # TensorFlow is imported here, quietly


def test_native_stderr_filter_drops_only_the_import_noise():
    code = textwrap.dedent("""
        import os, sys
        from trainer.quiet import native_stderr_filtered
        with native_stderr_filtered():
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
            os.write(2, b"I0000 00:00:1.5 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
                        b"GPU will not be used.\\n")
            os.write(2, b"E0000 something real\\n")
            print("from python", file=sys.stderr)
        print("after", file=sys.stderr)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=_clean_env())
    assert run.returncode == 0
    assert run.stderr == "E0000 something real\nfrom python\nafter\n"


def test_quiet_defaults_leave_a_users_setting_alone():
    code = "import os; from trainer.quiet import quiet_environment; quiet_environment(); " \
           "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    for env, expected in ((_clean_env(), "3"), (_clean_env(TF_CPP_MIN_LOG_LEVEL="0"), "0")):
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env=env)
        assert run.stdout.strip() == expected, run.stderr


# --------------------------------------------------------------------------------------------------
# A clean demo run
# --------------------------------------------------------------------------------------------------

FAST = ["data.synthetic={n_users: 60, n_ads: 40, n_impressions: 2000}", "retrieval.epochs=1", "ranking.epochs=1",
        "evaluation.baselines=[most_popular]", "retrieval.history_length=0"]

# What stderr may hold on a clean run: adrec log lines (and indented continuations of multi-line
# ones), Keras's per-epoch lines and early stopping's restore notice. Nothing else.
STDERR_LINES = (
    re.compile(r"^\[adrec \d\d:\d\d:\d\d\] "),
    re.compile(r"^\s+\S"),
    re.compile(r"^Epoch \d+/\d+$"),
    re.compile(r"^\d+/\d+ - \d+m?s - .*loss: "),
    re.compile(r"^Restoring model weights from the end of the best epoch: \d+\.$"),
)
NEVER = re.compile(r"(?i)warn|deprecat|traceback|\berror\b|non-serializable|get_config|absl|cudart|cuInit|"
                   r"^[IWEF]\d{4} ")


def test_demo_run_is_clean(tmp_path):
    """`adrec demo` as a user runs it (no TF_CPP_MIN_LOG_LEVEL set): no warning or TensorFlow banner on
    stderr, only log and progress lines; stdout holds the recommendations and metrics alone."""
    sets = [a for s in [*FAST, f"training.model_dir={tmp_path / 'run'}", f"export.export_dir={tmp_path / 'models'}"]
            for a in ("--set", s)]
    run = subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--config", "configs/tiny.yaml", *sets],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=_clean_env())
    assert run.returncode == 0, run.stderr[-3000:]
    err = run.stderr.splitlines()
    unexpected = [line for line in err if NEVER.search(line) or not any(p.match(line) for p in STDERR_LINES)]
    assert not unexpected, "unexpected stderr lines:\n" + "\n".join(unexpected)
    assert any("TensorFlow" in line and "GPU" in line for line in err)  # what TensorFlow runs on, said once
    assert any("exported version 1" in line for line in err)

    out = run.stdout.splitlines()
    assert not [line for line in out if NEVER.search(line) or any(p.match(line) for p in STDERR_LINES[:1] +
                                                                      STDERR_LINES[2:])]
    body = [line for line in out if line.strip()]
    assert body[0].startswith("user ") and sum(line.startswith("user ") for line in body) == 3
    # The job saw only pseudonyms; the demo asks as a caller would, by the world's own ids (u00001 ...),
    # and the client hashes them with the job's key.
    assert all(line.startswith("user u") for line in body if line.startswith("user "))
    assert sum("marked as shown" in line for line in body) == 3
    assert any(line.startswith("Retrieval, held-out clicks") for line in body)
    assert any(line.startswith("Ranking, held-out impressions") for line in body)


# --------------------------------------------------------------------------------------------------
# The adrec logger and progress
# --------------------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_goes_through_the_adrec_logger_to_stderr(capsys):
    import logging

    from trainer.progress import get_logger, log

    log("hello")
    get_logger("serving").warning("careful")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert re.fullmatch(r"\[adrec \d\d:\d\d:\d\d\] hello", lines[0])
    assert re.fullmatch(r"\[adrec \d\d:\d\d:\d\d\] warning: careful", lines[1])
    assert logging.getLogger("adrec").propagate is False  # a root handler would print every line twice


def test_progress_off_a_terminal_is_silent_when_short_and_periodic_when_long(monkeypatch, capsys):
    import time

    from trainer.progress import Progress

    with Progress("short step", total=3) as p:
        p.advance(3)
    assert capsys.readouterr().err == ""
    with Progress("long step", total=10, unit="things", every=0.05) as p:
        p.advance(4)
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "long step 4/10 things" in err and "so far" in err and "\r" not in err
    with Progress("timed", done="timed step") as p:
        pass
    assert re.search(r"\] timed step in \d+\.\ds$", capsys.readouterr().err.strip())


def test_progress_on_a_terminal_is_one_line_redrawn_and_cleared(monkeypatch):
    import time

    from trainer import progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.Progress("encoding ad texts", total=4, unit="texts") as p:
        time.sleep(0.15)  # redraws on `advance` are at most every 0.1 s
        p.advance(2)
        progress.log("a log line in between")
        p.advance(2)
    text = terminal.getvalue()
    assert "encoding ad texts 0/4 texts" in text and "encoding ad texts 2/4 texts" in text
    assert text.endswith("\r\x1b[K")  # nothing left behind
    logged = text.index("a log line in between")
    assert text[:logged].rsplit("\n", 1)[-1].startswith("\r\x1b[K[adrec")  # the live line was cleared first
    assert "\n" not in text.replace("a log line in between\n", "")  # the progress line itself never scrolls


def test_quiet_turns_progress_off(monkeypatch):
    from trainer import progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    previous = progress.set_progress(False)
    try:
        with progress.Progress("step", total=2) as p:
            p.advance(2)
        assert progress.fit_verbosity(True) == 0
    finally:
        progress.set_progress(previous)
    assert terminal.getvalue() == ""


# --------------------------------------------------------------------------------------------------
# get_config
# --------------------------------------------------------------------------------------------------

def test_scalar_layers_round_trip_through_their_config():
    from trainer.calibration import Calibrator
    from trainer.towers import SequenceEncoder, TransformerBlock, UserStatsFeatures

    for layer in (Calibrator(16, name="cal"), TransformerBlock(2, 8, 0.1, name="block"),
                  SequenceEncoder(2, 2, 8, 5, 0.1, name="seq"),
                  UserStatsFeatures(20, 0.07, strength=4.0, recent_strength=1.0, name="stats")):
        config = layer.get_config()
        json.dumps(config)
        assert type(layer).from_config(config).get_config() == config, type(layer).__name__
    assert SequenceEncoder(2, 2, 8, 5, 0.1).get_config()["heads"] == 2


def test_data_layers_describe_their_tables_by_size():
    import keras_hub

    from trainer.ranking import PositionTower
    from trainer.text_encoder import BertEncoderAdapter
    from trainer.towers import CatalogText, CategoricalEmbedding, FeatureEmbeddings, HistoryPooling, ItemStatsFeatures

    emb = CategoricalEmbedding(["a", "b", "c"], 4, False, l2=0.5, oov_rate=0.1, row_l2=np.ones(4))
    assert {k: emb.get_config()[k] for k in ("vocabulary_size", "dim", "is_int", "l2", "oov_rate", "row_l2_size")} \
        == {"vocabulary_size": 3, "dim": 4, "is_int": False, "l2": 0.5, "oov_rate": pytest.approx(0.1),
            "row_l2_size": 4}
    features = FeatureEmbeddings(("u", "h"), {"u": ["x", "y"], "h": [1, 2, 3]}, {"u": 4, "h": 2}, ("h",),
                                 oov_rates={"u": 0.2})
    config = features.get_config()
    assert config["dims"] == {"u": 4, "h": 2} and config["int_features"] == ["h"]
    assert config["vocabulary_sizes"] == {"u": 2, "h": 3} and config["oov_rates"] == {"u": pytest.approx(0.2)}
    history = HistoryPooling(["a", "b"], 4, ["a", "b"], np.zeros((2, 3), np.float32), attention_layers=1,
                             attention_heads=2, attention_length=5, attention_dim=8)
    assert history.get_config()["text_table_shape"] == [3, 3] and history.get_config()["attention_length"] == 5
    text = CatalogText(["a", "b"], cached_embeddings=np.zeros((2, 6), np.float32))
    assert text.get_config()["catalog_size"] == 2 and text.get_config()["output_dim"] == 6
    stats = ItemStatsFeatures(["a", "b"], np.zeros((3, 3)), np.zeros((3, 3)), 0.1)
    assert stats.get_config()["folds"] == 2 and stats.get_config()["vocabulary_size"] == 2
    tower = PositionTower({"device": ["mobile", "desktop"]}, units=8)
    assert tower.get_config()["context_vocabulary_sizes"] == {"device": 2}
    backbone = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16)
    adapter = BertEncoderAdapter(backbone, fine_tune=False)
    assert adapter.get_config()["backbone"]["config"]["hidden_dim"] == 8
    for layer in (emb, features, history, text, stats, tower, adapter):
        json.dumps(layer.get_config())


def test_keras_hook_timing_note_is_dropped_and_other_warnings_are_kept():
    """Keras warns that the batch hooks are slow when a hook that waits for the step's logs (its own
    progress bar's) outlasts the step's dispatch; `fit_stage` drops that one note, and nothing else."""
    import logging

    import tensorflow as tf

    from trainer.fit import HOOK_TIMING_NOTES, notes_dropped

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = tf.get_logger(), Keep()
    logger.addHandler(handler)
    try:
        keras_note = ("Callback method `on_train_batch_end` is slow compared to the batch time (batch time: "
                      "0.0010s vs `on_train_batch_end` time: 0.0050s). Check your callbacks.")
        with notes_dropped(HOOK_TIMING_NOTES):
            logger.warning(keras_note)
            logger.warning("a real problem")
        logger.warning(keras_note)
    finally:
        logger.removeHandler(handler)
    assert seen == ["a real problem", keras_note]
