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
# Two pytest workers of one thread each: the small models' steps are per-op overhead, which a second thread barely
# shortens (541 s instead of 693 s for the suite of 2026-11-29, in the same conditions). worksteal: each worker
# starts on one contiguous half of the tests (a file's module fixtures built once, but where a file is split) and
# an idle worker takes over half of the other's queue, so a run no longer waits on one worker's last heavy files.
test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 --dist worksteal
