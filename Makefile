# Set-up and the two commands a newcomer needs: `make demo` and `make test`.
# Re-running any target reuses the virtual environment and the asset cache.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The IPEX environment lives in the asset cache, outside any clone, so CI runs and clean clones reuse it.
IPEX_VENV ?= $(HOME)/.cache/inc-plugins/venv-ipex
RECIPE ?= minilm_mask_search.yaml
PYTEST_ARGS ?=

.PHONY: install assets demo test validate bench-smoke bench ipex-env clean clean-ipex

# torch==2.13.0 goes in first: it is the CPU wheel these machines carry, and installing the project
# with no torch present could let pip pick a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(BIN)/python -m inc_plugins.assets fetch

demo: assets
	$(BIN)/python -m recipes.apply $(RECIPE)

test: assets
	$(BIN)/python -m pytest $(PYTEST_ARGS)

validate: install
	$(BIN)/python -m recipes.validate recipes/*.yaml

# Every benchmark suite once on the tiny encoder and decoder, default backend: what CI runs (timings meaningless).
bench-smoke: install
	for scale in tiny tiny-llama; do \
		$(BIN)/python -m pytest benchmarks/ -q -rs --bench-scale $$scale --bench-backends eager-fp32 --benchmark-disable \
			|| exit 1; \
	done

# The README's benchmark figures: MiniLM, every suite, main and IPEX environments. Run on a quiet machine.
bench: assets
	$(BIN)/python -m benchmarks.suites.readme_figures

# IPEX 2.8 only works with torch 2.8, so it gets an environment of its own (about 4 GB: the only
# torch 2.8 on the registry is a CUDA build). The project's other dependencies are installed without its torch pin.
$(IPEX_VENV)/.installed: pyproject.toml
	test -x $(IPEX_VENV)/bin/python || $(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(IPEX_VENV)/bin/python -m pip install --quiet 'torch==2.8.*' 'torchvision==0.23.*' 'intel-extension-for-pytorch==2.8.0'
	$(IPEX_VENV)/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		print("\n".join(r for r in p["dependencies"] + p["optional-dependencies"]["test"] if not r.startswith("torch")))' \
		> $(IPEX_VENV)/requirements.txt
	$(IPEX_VENV)/bin/python -m pip install --quiet -r $(IPEX_VENV)/requirements.txt
	$(IPEX_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

ipex-env: $(IPEX_VENV)/.installed

# The IPEX environment is kept: rebuilding it is a 4 GB download. `make clean-ipex` removes it.
clean:
	rm -rf $(VENV) .pytest_cache

clean-ipex:
	rm -rf $(IPEX_VENV)
