# Both entry points create .venv on a fresh machine and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint venv clean chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m qpasses_zoo.demo

test: $(STAMP) chromium
	$(PY) -m ruff check qpasses zoo tools tests
	$(PY) -m pytest -q tests

# Headless Chromium and a font for the visualiser's browser tests, and Graphviz's `dot` for its SVG test
# (Debian/Ubuntu); those tests skip without them.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	-@{ command -v chromium && command -v dot; } >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core graphviz; }

lint: $(STAMP)
	$(PY) -m ruff check qpasses zoo tools tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
