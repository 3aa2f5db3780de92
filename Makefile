# vitflow — a newcomer runs `make demo` and `make test`; each does its own set-up.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's local wheel folders print one warning per package; keep the log readable.
# Only grep's "no line left" status is ignored: with pipefail a failing pip still fails make.
PIPQUIET := (grep -v "is ignored: it is neither a file nor a directory" || true)

export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: help install demo test test-fast lint bench clean

help:
	@echo "make install  - create .venv and install vitflow with its dev tools (idempotent)"
	@echo "make demo     - embed a generated image folder on a local Ray and show the result"
	@echo "make test     - run the whole test suite (no GPU, no network)"
	@echo "make lint     - ruff"
	@echo "make bench    - embed throughput (vitflow vs plain loop vs bare model), training 1 vs 2 workers"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | $(PIPQUIET)
	$(BIN)/python -c "import vitflow, torch, timm, ray; print('installed: torch', torch.__version__, '| timm', timm.__version__, '| ray', ray.__version__)"
	@touch $(STAMP)

demo: install
	rm -rf demo-out
	$(BIN)/python -m vitflow.synthetic demo-out/images --per-class 8 --bad-files
	$(BIN)/vitflow embed jobs/demo.yaml
	$(BIN)/python -c "import vitflow; df = vitflow.load_embeddings('demo-out/embeddings', include_errors=True); \
	print(df.groupby(['split', 'status']).size().to_string()); \
	print('vectors:', {c: len(df[c].dropna().iloc[0]) for c in ('emb', 'cls_last', 'last2_mean')})"
	@echo "demo output: $$(pwd)/demo-out/embeddings (parquet shards + _manifest.json)"

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check vitflow tests benchmarks
	$(BIN)/ruff format --check vitflow tests benchmarks

bench: install
	$(BIN)/python benchmarks/embed_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/reindex_ratio.py

clean:
	rm -rf demo-out bench-out .pytest_cache
