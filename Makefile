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

# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning between ops; with the suite's own
# multi-process tests (and anything else) on 2 cores, spinning made tests 2-3x slower (tests/conftest.py too).
# Two pytest workers of one thread each, a test file per worker (module fixtures stay shared): the small models'
# steps are per-op overhead, which a second thread barely shortens; 541 s instead of 693 s for the whole suite,
# measured in the same conditions (README, "Tests").
test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
