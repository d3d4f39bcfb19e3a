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
	cd benchmarks && ../$(PY) serve_throughput.py
	cd benchmarks && ../$(PY) kv_capacity.py
	cd benchmarks && ../$(PY) kv_accuracy.py
	cd benchmarks && ../$(PY) kernels_bench.py

clean:
	rm -rf $(VENV_VLLM) models benchmarks/out
