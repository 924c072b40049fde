# finetune-helper: `make demo` and `make test` work on a fresh machine (CPU, offline).
# torch is installed first and pinned: `pip install torch==2.13.0` takes the CPU wheel on disk here, while an
# unpinned resolve could pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False
# DeepSpeed compiles its CPU ops on first use (the shared-memory collectives ~40 s, CPU Adam ~2 min on 2 cores) into
# torch's extensions cache. Its build commands name the venv's path, so checkouts sharing the default cache
# (~/.cache/torch_extensions) rebuild each other's ops at every switch: one cache folder per venv path keeps each
# checkout's build (a fresh clone at the same path reuses it).
TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions/venv$(subst /,_,$(abspath $(VENV)))
export TORCH_EXTENSIONS_DIR
# The browser tests drive Debian's chromium through Playwright; `playwright install` cannot download here.
CHROMIUM ?= /usr/bin/chromium
export FINETUNE_HELPER_CHROMIUM := $(CHROMIUM)

# The demo, the tests and the benchmarks run offline (nothing may reach the Hub); `make app` and the installed
# commands do not force it, so the app can download the models and datasets its users name.
OFFLINE_TARGETS := demo test test-unit test-integration test-browser test-fast test-latest bench
$(OFFLINE_TARGETS): export HF_HUB_OFFLINE := 1
$(OFFLINE_TARGETS): export TRANSFORMERS_OFFLINE := 1
$(OFFLINE_TARGETS): export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-unit test-integration test-browser test-fast test-latest lock bench clean chromium app

# constraints.txt pins every package to the versions the tests last passed with (`make lock` rewrites it), so a
# fresh machine installs what was tested; `make test-latest` tests the newest versions pyproject.toml allows.
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	@echo "== finetune-helper recommend: Llama-3.1-8B, LoRA, one 24 GB RTX 4090, 20k examples =="
	$(VENV)/bin/finetune-helper recommend --model meta-llama/Llama-3.1-8B --gpu "RTX 4090" --method lora --dataset-size 20000 --epochs 2
	@echo
	@echo "== finetune-helper export --format yaml (reads back with HfArgumentParser.parse_yaml_file) =="
	$(VENV)/bin/finetune-helper export --model meta-llama/Llama-3.1-8B --gpu "RTX 4090" --method lora --dataset-size 20000 --epochs 2 --format yaml
	@echo
	@echo "== finetune-helper run recipes/tiny-demo.yaml: the embedded tiny default, offline, on the CPU =="
	$(VENV)/bin/finetune-helper run recipes/tiny-demo.yaml --output-dir runs/tiny-demo-$$(date +%Y%m%d-%H%M%S)

# apt needs root: as root (CI, the dev machines) it installs chromium; elsewhere install it yourself
chromium:
	@test -x $(CHROMIUM) || (apt-get install -y -q chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium >/dev/null)) || (echo "install Debian's chromium (apt-get install chromium) for the browser tests" && exit 1)

# Test tiers, all run by `make test` (CI): unit (pure Python, well under 30 s), integration (CPU training, launcher
# processes, the app server), browser (the app in headless chromium).
PYTEST := $(PY) -m pytest -q --durations=15

test: test-unit test-integration test-browser

test-unit: setup
	FH_TIER=unit $(PYTEST) -m "not integration and not browser"

# The integration tier on TEST_WORKERS pytest-xdist workers (1: one process, as before). Much of its time is one
# core's: processes importing the stack, runs waiting on signals and slow saves; two workers overlap those (measured on
# 2 cores: 1180 s -> 858-875 s). Each worker's torch takes one thread (OMP_NUM_THREADS, as torchrun gives its
# workers), so that two never contend for the cores; the numerical tests hold at 1 and 2 threads. --dist worksteal: an
# idle worker takes half of a busy one's queue (the tier's tests range from milliseconds to minutes).
TEST_WORKERS ?= 2
test-integration: setup
	$(if $(filter 1,$(TEST_WORKERS)),$(PYTEST),OMP_NUM_THREADS=1 $(PYTEST) -n $(TEST_WORKERS) --dist worksteal) -m "integration and not browser"

test-browser: setup chromium
	$(PYTEST) -m browser

app: setup
	$(VENV)/bin/finetune-helper app

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser"

# the newest releases pyproject.toml allows, in a separate venv (torch stays pinned: see TORCH_SPEC)
test-latest: chromium
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|trl|peft|accelerate|datasets|gradio)=='
	$(LATEST_VENV)/bin/python -m pytest -q

# rewrite constraints.txt from the venv the tests just passed in (VENV=.venv-latest after `make test-latest`)
lock:
	( echo "# Versions the tests passed with: make setup installs these (pip -c). Rewritten by 'make lock'."; \
	  $(VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' ) > $(CONSTRAINTS)

bench: setup
	$(PY) benchmarks/recommend_speed.py
	$(PY) benchmarks/memory_accuracy.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache .hypothesis
