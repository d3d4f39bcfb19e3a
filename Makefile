# Two commands: `make demo` and `make test`. Both set everything up first.
VENV_VLLM := .venv-vllm
VENV_SGLANG := .venv-sglang
PY := $(VENV_VLLM)/bin/python
SGL_PY := $(VENV_SGLANG)/bin/python
# The SGLang environment runs what depends on its own engine and torch: the SGLang adapter's unit tests, and the
# host attention and the torch device built against its torch. Engine-free tests (emulator, serving, formats) run once, in .venv-vllm.
SGLANG_UNIT := tests/unit/sglang tests/unit/ops/test_ops_host.py tests/unit/torch/test_torch_device.py

.PHONY: demo demo-sglang test test-unit test-e2e setup setup-vllm setup-sglang lint bench mutation clean

# Both environments at once (two jobs): pip spends much of its time on the disk, so the two installs overlap
# well on two cores.
setup:
	$(MAKE) -j2 setup-vllm setup-sglang

# Each environment also builds, for its own torch, the native host attention (maia_serving/ops/native.py) and
# the maia torch device (maia_serving/torch/extension.py); seconds each when their sources are unchanged.
# (MAIA_SERVING_TORCH_DEVICE=off: the device is not built yet, and `import torch` would say so.)
setup-vllm:
	bash scripts/setup-vllm.sh
	MAIA_SERVING_TORCH_DEVICE=off $(PY) -m maia_serving.ops.native
	MAIA_SERVING_TORCH_DEVICE=off $(PY) -m maia_serving.torch

setup-sglang:
	bash scripts/setup-sglang.sh
	MAIA_SERVING_TORCH_DEVICE=off $(SGL_PY) -m maia_serving.ops.native
	MAIA_SERVING_TORCH_DEVICE=off $(SGL_PY) -m maia_serving.torch

demo: setup-vllm
	$(PY) scripts/demo.py

demo-sglang: setup-sglang
	$(PY) scripts/demo.py --engine sglang

# The vLLM environment drives every end-to-end test (SGLang's servers run from
# .venv-sglang); the SGLang adapter's unit tests run in .venv-sglang.
# Three pytest-xdist workers on two cores, a test file each at a time (module-wide servers start once; the
# files that use the session-wide servers are one group, tests/conftest.py): a server starts in single-threaded
# imports and its clients wait on replies, so two workers left a third of the CPU idle (146% of 200%; three:
# 153%, and a fresh clone's .ci/run 23 -> 19 min, benchmarks/README.md). The slowest files go first (tests/conftest.py), in
# that order: xdist's own reorder would start with the unit files of most tests and leave one worker alone
# with the last long file.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup
	$(SGL_PY) -m pytest $(SGLANG_UNIT)
	$(PY) -m pytest $(XDIST) tests

test-unit: setup
	$(SGL_PY) -m pytest $(SGLANG_UNIT)
	$(PY) -m pytest $(XDIST) tests/unit

test-e2e: setup
	$(PY) -m pytest $(XDIST) tests/e2e

# Lint, format and types (CI runs it before the suite): ruff's rules and format over the tree; mypy --strict over
# the engine-free floors (formats, envs, the emulator, serving), whose types the adapters and tools lean on.
LINTED := maia_serving tests benchmarks scripts
TYPED := maia_serving/formats maia_serving/envs.py maia_serving/emulator maia_serving/serving
lint: setup-vllm
	$(VENV_VLLM)/bin/ruff check $(LINTED)
	$(VENV_VLLM)/bin/ruff format --check $(LINTED)
	$(VENV_VLLM)/bin/mypy --strict $(TYPED)

bench: setup
	cd benchmarks && ../$(PY) serve_throughput.py
	cd benchmarks && ../$(PY) engines.py
	cd benchmarks && ../$(PY) kv_capacity.py
	cd benchmarks && ../$(PY) kv_accuracy.py
	cd benchmarks && ../$(PY) kernels_bench.py
	cd benchmarks && ../$(PY) simulator_speed.py --moe
	cd benchmarks && ../$(PY) fidelity.py
	cd benchmarks && ../$(PY) live_vs_simulate.py
	cd benchmarks && ../$(PY) live_arrivals.py
	cd benchmarks && ../$(PY) reliability.py

# Mutation testing of the emulator's pricing path and both adapters' step charging (not in CI:
# over an hour on two cores). mutmut's settings: pyproject.toml [tool.mutmut]; SGLang's stepping.py
# needs .venv-sglang, hence scripts/mutation_sglang.py. Results and equivalents: benchmarks/MUTATION.md.
mutation: setup
	$(PY) -m pip install -q "$$(grep -o 'mutmut==[0-9.]*' pyproject.toml)"
	rm -rf mutants
	$(VENV_VLLM)/bin/mutmut run
	$(PY) scripts/mutation_sglang.py
	$(PY) scripts/mutation_report.py --survivors

clean:
	rm -rf $(VENV_VLLM) $(VENV_SGLANG) models benchmarks/out
