# Both entry points create .venv on a fresh machine and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m zoo.demo

test: $(STAMP)
	$(PY) -m ruff check qpasses zoo tools tests
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check qpasses zoo tools tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
