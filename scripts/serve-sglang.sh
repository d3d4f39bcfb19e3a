#!/usr/bin/env bash
# Serve a model with SGLang on the emulated Maia device:
#   scripts/serve-sglang.sh [--profile NAME] MODEL_DIR [SGLang launch_server flags...]
# e.g. scripts/serve-sglang.sh --profile maia100 models/demo --port 30000 --enable-metrics
# The profile (maia100, maia200, h100-sxm, h200, host; default maia200) goes to the
# engine through MAIA_SERVING_PROFILE. Needs .venv-sglang (make setup-sglang).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "--profile" ]; then
  export MAIA_SERVING_PROFILE="$2"
  shift 2
fi
if [ $# -lt 1 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
MODEL="$1"
shift
[ -x "$ROOT/.venv-sglang/bin/python" ] || { echo "no .venv-sglang: run make setup-sglang" >&2; exit 2; }
exec "$ROOT/.venv-sglang/bin/python" -m sglang.launch_server --model-path "$MODEL" --device maia "$@"
