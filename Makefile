# Two commands: `make demo` and `make test`. Both set everything up first.
VENV_VLLM := .venv-vllm
PY := $(VENV_VLLM)/bin/python

.PHONY: demo test test-unit test-e2e setup-vllm lint bench clean

setup-vllm:
	bash scripts/setup-vllm.sh

demo: setup-vllm
	$(PY) scripts/demo.py

test: setup-vllm
	$(PY) -m pytest tests

test-unit: setup-vllm
	$(PY) -m pytest tests/unit

test-e2e: setup-vllm
	$(PY) -m pytest tests/e2e

lint: setup-vllm
	$(VENV_VLLM)/bin/ruff check maia_serving kernels tests benchmarks scripts

bench: setup-vllm
	$(PY) benchmarks/emulator_overhead.py
	$(PY) benchmarks/serve_throughput.py

clean:
	rm -rf $(VENV_VLLM) models benchmarks/out
