# The two commands of the README:
#   make demo   install, then run imgdl on the bundled sample images served on 127.0.0.1
#   make test   install, then lint, type-check and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest
