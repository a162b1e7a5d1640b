# The two commands of the README:
#   make demo   install, then run imgdl on the bundled sample images served on 127.0.0.1
#   make test   install, then lint, type-check and run the tests
# and, after a change to a setting in downloader/settings.py:
#   make docs   regenerate docs/configuration.md and config/imgdl.yaml from it
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint docs
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m compileall -q downloader  # as pip does for a normal install: a quicker start
	touch $@

demo: install
	$(PY) examples/demo.py

docs: install
	$(PY) -m downloader.configdoc --write

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest
