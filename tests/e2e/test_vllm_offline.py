"""The offline API, `LLM(...)` with MAIA_SERVING_DEVICE=maia, on one chip and on two (TP=2)."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.utils.launch import child_env

SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_model_len=256, enforce_eager=True, tensor_parallel_size=int(sys.argv[2]))
    outs = llm.generate(["def main():", "import sys"], SamplingParams(max_tokens=8, temperature=0))
    print("RESULT", json.dumps({"platform": current_platform.device_name,
                                "tokens": [list(o.outputs[0].token_ids) for o in outs]}))
"""


def _run(demo_model, tmp_path, tp: int, extra_env: dict[str, str] | None = None) -> tuple[dict, str]:
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    env = child_env(
        {
            "MAIA_SERVING_DEVICE": "maia",
            "MAIA_SERVING_PROFILE": "h100-sxm",
            "VLLM_CPU_CI_ENV": "1",
            "MAIA_SERVING_LOG_INTERVAL_S": "0",
            **(extra_env or {}),
        }
    )
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    out = subprocess.run(
        [sys.executable, str(script), str(demo_model), str(tp)], env=env, capture_output=True, text=True, timeout=400
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), out.stdout + out.stderr  # vLLM logs to stdout


@pytest.fixture(scope="module")
def one_chip(demo_model, tmp_path_factory):
    return _run(demo_model, tmp_path_factory.mktemp("tp1"), 1)


def test_offline_llm_runs_on_maia(one_chip):
    result, log = one_chip
    assert result["platform"] == "maia"
    assert [len(t) for t in result["tokens"]] == [8, 8]
    assert "Maia KV cache: emulated h100-sxm holds" in log
    assert "Maia emulation [h100-sxm]" in log
    assert "Maia attention backend: maia_serving.vllm.attention.MaiaAttentionBackend" in log


def test_tensor_parallel_two_chips_same_tokens_and_pays_for_collectives(one_chip, demo_model, tmp_path):
    result, log = _run(demo_model, tmp_path, 2)
    assert result["tokens"] == one_chip[0]["tokens"]
    assert "communication 0 ns" in one_chip[1]  # one chip: no collectives
    comm = re.findall(r"communication ([0-9.]+) us", log)
    assert comm and all(float(c) > 0 for c in comm)


def test_vllm_cpu_attention_switch_gives_the_same_charging(one_chip, demo_model, tmp_path):
    """MAIA_SERVING_ATTENTION=vllm-cpu: vLLM's C++ kernel on the host, the same emulation."""
    result, log = _run(demo_model, tmp_path, 1, {"MAIA_SERVING_ATTENTION": "vllm-cpu"})
    assert result["platform"] == "maia"
    assert [len(t) for t in result["tokens"]] == [8, 8]
    assert "Maia attention backend: vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend" in log
    assert "MAIA_ATTN" not in log
    assert "Maia emulation [h100-sxm]" in log
