# Two commands set up a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m connectors demo

test: install
	$(PYTHON) -m pytest

bench:
	$(PYTHON) -m benchmarks.store_bench --quick
