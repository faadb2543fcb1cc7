# MoE Router Lab: two commands, both idempotent, both from a clean clone.
#   make serve   set up .venv and serve the dashboard on http://localhost:5006
#   make test    set up .venv (+ transformers, Debian chromium, nginx and libjemalloc2 for the tests) and run the whole suite
#   make check   the fast tier while you work: everything but the browser, serving and slow tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 5006

# Without an NVIDIA GPU, take torch's CPU build (about 200 MB) instead of the default
# multi-GB CUDA build; with one, a normal torch install.
HAS_NVIDIA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_SPEC  ?= $(if $(HAS_NVIDIA),torch>=2.4,torch==2.13.0)
TORCH_INDEX ?= $(if $(HAS_NVIDIA),,--extra-index-url https://download.pytorch.org/whl/cpu)
CHROMIUM    ?= /usr/bin/chromium

.PHONY: serve test check setup bench-deps browser bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --retries 1 "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# transformers, for `moe-lab bench`'s Hugging Face baseline and the test that it computes our layer
# (make test and make bench only: serving does not need it)
bench-deps: $(VENV)/.bench

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y chromium >/dev/null || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y chromium >/dev/null; }; }
	@test -x $(CHROMIUM) || { echo "chromium not found at $(CHROMIUM); set CHROMIUM=/path/to/chromium"; exit 1; }
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  echo "installing Debian nginx for tests/test_serving.py (the tests run their own, unprivileged, on loopback)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y nginx >/dev/null || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y nginx >/dev/null; }; }
	@/sbin/ldconfig -p 2>/dev/null | grep -q libjemalloc || { \
	  echo "installing Debian libjemalloc2: the served app's allocator (app/allocator.py), tested by the suite"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y libjemalloc2 >/dev/null || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y libjemalloc2 >/dev/null; }; }

serve: setup
	$(PY) -m moe_core serve --port $(PORT)

test: setup bench-deps browser
	CHROMIUM_PATH=$(CHROMIUM) $(PY) -m pytest

check: setup bench-deps
	$(PY) -m pytest -q -m "not ui and not serving and not slow"

bench: setup bench-deps
	$(PY) -m moe_core bench

clean:
	rm -rf $(VENV) artifacts
