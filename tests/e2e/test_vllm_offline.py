"""The offline API: `LLM(...)` with MAIA_SERVING_DEVICE=maia."""

import os
import subprocess
import sys

SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_model_len=256, enforce_eager=True)
    outs = llm.generate(["def main():", "import sys"], SamplingParams(max_tokens=8, temperature=0))
    print(json.dumps({"platform": current_platform.device_name,
                      "tokens": [len(o.outputs[0].token_ids) for o in outs]}))
"""


def test_offline_llm_runs_on_maia(demo_model, tmp_path):
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MAIA_SERVING_DEVICE": "maia", "MAIA_SERVING_PROFILE": "h100-sxm",
           "VLLM_CPU_CI_ENV": "1", "MAIA_SERVING_LOG_INTERVAL_S": "0"}
    out = subprocess.run([sys.executable, str(script), str(demo_model)], env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert '{"platform": "maia", "tokens": [8, 8]}' in out.stdout
    log = out.stdout + out.stderr  # vLLM logs to stdout
    assert "Maia KV cache: emulated h100-sxm holds" in log
    assert "Maia emulation [h100-sxm]" in log
