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

# The two scenarios run side by side, one core each (both use 1 torch thread); the merge
# scenario's log goes to results/merge_scenario.log and its table is printed at the end.
demo: $(STAMP)
	@mkdir -p results
	@$(PY) python_examples/federated_finetune.py --scenario merge --no-progress > results/merge_scenario.log 2>&1 & merge=$$!; \
	$(PY) python_examples/federated_finetune.py; rounds=$$?; \
	echo "waiting for the merge scenario (log: results/merge_scenario.log) ..."; wait $$merge; merged=$$?; \
	tail -n 14 results/merge_scenario.log; test $$rounds -eq 0 && test $$merged -eq 0

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

bench: $(STAMP)
	$(PY) bench/run_bench.py --device cpu

bench-smoke: $(STAMP)
	FEDROT_BENCH=smoke $(PY) -m pytest bench -q

clean:
	rm -rf build fedrot_ext/_C*.so $(VENV)
