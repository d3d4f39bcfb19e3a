#!/usr/bin/env bash
# Serve a model with SGLang on the emulated Maia device:
#   scripts/serve-sglang.sh [--profile NAME] [--maia-model SHAPE] MODEL_DIR [SGLang launch_server flags...]
# e.g. scripts/serve-sglang.sh --profile maia200 --maia-model llama-3-8b models/demo --port 30000 --enable-metrics
# The profile (maia100, maia200, h100-sxm, h200, host; default maia200) goes to the engine
# through MAIA_SERVING_PROFILE; the proxy shape priced instead of MODEL_DIR (a built-in name
# or a config.json; default: MODEL_DIR itself) through MAIA_SERVING_MODEL, as SGLang has no
# free-form config flag. Needs .venv-sglang (make setup-sglang).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
while [ $# -ge 2 ]; do
  case "$1" in
    --profile) export MAIA_SERVING_PROFILE="$2"; shift 2 ;;
    --maia-model) export MAIA_SERVING_MODEL="$2"; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
MODEL="$1"
shift
[ -x "$ROOT/.venv-sglang/bin/python" ] || { echo "no .venv-sglang: run make setup-sglang" >&2; exit 2; }
exec "$ROOT/.venv-sglang/bin/python" -m sglang.launch_server --model-path "$MODEL" --device maia "$@"
