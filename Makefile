# Both entry points create .venv on a fresh machine and install everything they need.
PYTHON ?= python3
VENV ?= .venv
# TORCH_SPEC: a pip constraints file pinning torch and torchvision for this venv (.ci/torch-*.txt), e.g.
#   make test VENV=.venv-torch2.13 TORCH_SPEC=.ci/torch-2.13.txt
# It is passed as PIP_CONSTRAINT, which replaces any constraint file pip's own configuration names (on a
# machine whose pip caps torch, that is how a release above the cap installs). Empty: the newest torch that
# pyproject.toml and pip's configuration allow.
TORCH_SPEC ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_ENV := $(if $(TORCH_SPEC),PIP_CONSTRAINT=$(abspath $(TORCH_SPEC)))

.PHONY: demo test lint venv clean chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(TORCH_SPEC) | $(PY)
	$(PIP_ENV) $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m qpasses_zoo.demo

test: $(STAMP) chromium
	@$(PY) -c "import torch, torchvision; print('testing with torch', torch.__version__, 'torchvision', torchvision.__version__)"
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
	rm -rf $(VENV) .venv-torch* .pytest_cache .ruff_cache .hypothesis
