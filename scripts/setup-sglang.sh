#!/usr/bin/env bash
# Create .venv-sglang/: SGLang 0.5.23 (torch 2.14.1) with maia-serving installed editable.
# Idempotent: a second run only re-checks.
#
# SGLang's own requirement list is about 11 GB of GPU-only packages (flashinfer,
# sgl-kernel, deep-ep, flash-attn-4, cutlass-dsl, tilelang...) that the maia platform
# never imports, so this installs SGLang without its dependencies over the list the
# server needs (requirements/sglang-lean.txt): 6.3 GB, about 3 minutes. `pip install
# maia-serving[sglang]` (the full list) works too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-sglang
PY=${PYTHON:-python3}
STAMP="$VENV/.maia-setup-$(sha1sum pyproject.toml requirements/sglang-lean.txt scripts/setup-sglang.sh | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch 2.14.1 and torchvision 0.29.1 come from the machine's wheel folder when present.
"$VENV/bin/pip" install -q -r requirements/sglang-lean.txt
"$VENV/bin/pip" install -q --no-deps "sglang==0.5.23"
flock .editable-install.lock "$VENV/bin/pip" install -q --no-deps -e .  # see setup-vllm.sh
"$VENV/bin/pip" install -q pyyaml safetensors "pytest>=8" "hypothesis>=6.100"
rm -f "$VENV"/.maia-setup-*
touch "$STAMP"
