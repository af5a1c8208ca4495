# Two commands do everything on a fresh clone (Python 3.11 + pip only):
#   make demo   set up, then run the main job on the built-in defaults
#   make test   set up, then run the whole test suite (what CI runs)
# Set-up is incremental: the venv is rebuilt only when pyproject.toml changes, and model/data
# assets are fetched once into $(SOLC_CACHE) (default ~/.cache/solc).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.solc-installed

.PHONY: demo test setup assets eval-assets

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

assets: $(STAMP)
	$(PY) -m solc.fetch

setup: assets

# Multiple-choice data for `python -m training.evaluate` (BIG-bench sdist + evals wheel from PyPI,
# 358 MB download, once); not needed by the tests or the demo.
eval-assets: $(STAMP)
	$(PY) -m solc.eval_assets

demo: setup
	$(PY) -m training.demo

test: setup
	$(PY) -m pytest -q tests
