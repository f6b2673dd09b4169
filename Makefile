# Two commands that work on a fresh machine (Python 3.11 with pip and venv):
#   make demo   set up .venv and run the main job (Focus-N-Fix on the embedded shapes world, CPU)
#   make test   set up .venv and run the test suite
PYTHON ?= python3.11
VENV := .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,nudenet,loggers]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/fnf fit --config configs/artifacts.yaml

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q
