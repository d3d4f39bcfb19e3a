"""Run by the e2e tests with .venv-sglang's Python: offline `sglang.Engine(..., device="maia")`.

Usage: sglang_offline.py MODEL PROMPTS_JSON [ENGINE_KWARGS_JSON]. Prints one line
``RESULT {"texts": [...], "ids": [[...], ...]}`` (each prompt's greedy completion, 12 tokens); the engine's
log goes to stderr.
"""

import json
import sys

import sglang as sgl

if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    engine = sgl.Engine(model_path=model, device="maia", log_level="info", **kwargs)
    try:
        outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 12})
        print("RESULT " + json.dumps({"texts": [o["text"] for o in outs], "ids": [o["output_ids"] for o in outs]}))
    finally:
        engine.shutdown()
