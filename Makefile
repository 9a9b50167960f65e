# Newcomer entry points (see README): each target sets up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedrot-installed
export MAX_JOBS ?= 2

.PHONY: install demo test bench bench-smoke clean

$(STAMP): pyproject.toml setup.py $(shell find csrc -type f)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==2.14.1" "setuptools>=64" wheel ninja numpy
	$(PY) -m pip install --no-build-isolation -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) python_examples/federated_finetune.py
	$(PY) python_examples/federated_finetune.py --scenario merge

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

bench: $(STAMP)
	$(PY) bench/run_bench.py --device cpu

bench-smoke: $(STAMP)
	FEDROT_BENCH=smoke $(PY) -m pytest bench -q

clean:
	rm -rf build fedrot_ext/_C*.so $(VENV)
