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
# The exact versions `make install` installs, tested together; pyproject.toml has only ranges.
CONSTRAINTS := constraints.txt
# make install TORCH=cpu: PyTorch's CPU-only wheels instead of PyPI's default CUDA build (several
# GB less on a laptop); another of PyTorch's indexes works too (TORCH=cu128). The flavour of a
# .venv is fixed at its first install: to switch, rm -rf .venv first.
TORCH ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)
# Fails unless .venv's torch is that build (read from its metadata: no import). pip falls back to
# other indexes it knows when TORCH_INDEX is unreachable or lacks the pinned version.
TORCH_CHECK = $(BIN)/python -c 'import sys; from importlib.metadata import requires, version; \
	v = version("torch"); cuda = any(r.startswith(("nvidia", "cuda")) for r in requires("torch") or []); \
	sys.exit(None if v.endswith("+$(TORCH)") or ("$(TORCH)" == "cpu" and not cuda) else \
	f"$(VENV) has torch {v}, not the $(TORCH) build from $(TORCH_INDEX) (a venv keeps the torch it was \
	made with; pip takes another when that index is unreachable): rm -rf $(VENV), then make install TORCH=$(TORCH)")'

export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: help install browser demo test lint bench clean

help:
	@echo "make install  - create .venv and install vitflow with its dev tools, pinned by constraints.txt (idempotent)"
	@echo "                TORCH=cpu: PyTorch's CPU-only build instead of the CUDA one (much smaller)"
	@echo "make demo     - embed a generated image folder on a local Ray and show the result"
	@echo "make test     - run the whole test suite (no GPU; apt-get installs chromium for the report test if missing)"
	@echo "make lint     - ruff"
	@echo "make bench    - embed throughput as ratios (decode-bound, model-bound, object storage, scale,"
	@echo "                GPU where CUDA is), training 1 vs 2 workers, reindex; QUICK=1: smoke run"

install: $(STAMP)
ifneq ($(TORCH),)
	@$(TORCH_CHECK)
endif

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifneq ($(TORCH),)
	$(BIN)/python -m pip install -q --no-deps torch torchvision -c $(CONSTRAINTS) --index-url $(TORCH_INDEX) 2>&1 | $(PIPQUIET)
	@$(TORCH_CHECK)
endif
	$(BIN)/python -m pip install -q -e '.[dev]' -c $(CONSTRAINTS) 2>&1 | $(PIPQUIET)
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

# The report test opens vitflow's HTML page in a real headless browser: Debian's chromium,
# installed here when missing (as root, or with passwordless sudo). Where it cannot be installed
# that one test is skipped and says why; everything else runs.
APT_GET = $(if $(filter 0,$(shell id -u)),,sudo -n) env DEBIAN_FRONTEND=noninteractive apt-get \
	-o Acquire::Retries=1 -o Acquire::http::Timeout=20
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
	  { $(APT_GET) update -qq && $(APT_GET) install -y -qq chromium >/dev/null; } \
	  || echo "make: could not install chromium (apt-get failed): the report's browser test will be skipped"; }

test: install browser
	$(BIN)/python -m pytest -q --durations=25

lint: install
	$(BIN)/ruff check vitflow tests benchmarks
	$(BIN)/ruff format --check vitflow tests benchmarks

# Issue 10's cases, each one table of ratios measured side by side, also written as JSON under
# bench-out/results/. QUICK=1: a smoke run of each (tens of images). The GPU case runs only
# where torch sees CUDA (on a GPU machine without internet see benchmarks/gpu_throughput.py).
BENCH_FLAGS = $(if $(filter-out 0,$(QUICK)),--quick,)
HAS_CUDA = $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'

bench: install
	$(BIN)/python benchmarks/decode_bound.py $(BENCH_FLAGS)
	$(BIN)/python benchmarks/embed_throughput.py $(BENCH_FLAGS)
	$(BIN)/python benchmarks/object_store.py $(BENCH_FLAGS)
	$(BIN)/python benchmarks/scale.py $(BENCH_FLAGS)
	@if $(HAS_CUDA); then $(BIN)/python benchmarks/gpu_throughput.py $(BENCH_FLAGS); \
	else echo "bench: torch sees no CUDA here: the GPU case (benchmarks/gpu_throughput.py) is left out"; fi
ifeq ($(filter-out 0,$(QUICK)),)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/reindex_ratio.py
endif

clean:
	rm -rf demo-out bench-out .pytest_cache
