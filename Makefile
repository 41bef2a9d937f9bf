# Two commands do everything on a fresh machine: `make run` (the main job) and `make test`.
# torch==2.13.0 is installed first, alone: on this machine that takes the local CPU build,
# while any other spec would pull several GB of CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: setup run test
setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lowbit eval --recipe minmax-w8a8 --recipe dgq-w8a8 --samples 200 --out out/eval --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile  # one worker per core, a test file per worker (its fixtures built once)
