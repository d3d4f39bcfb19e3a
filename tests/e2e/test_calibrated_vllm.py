"""A `maia-serving calibrate-kv` checkpoint loads into STOCK vLLM with its scales.

Stock means vLLM's built-in CPU platform: MAIA_SERVING_DEVICE unset, no --device. Where
vLLM's CPU attention supports an FP8 cache (x86 with AVX-512 or AMX) the whole offline
engine starts, `LLM(model, kv_cache_dtype="fp8")`, and `llm.apply_model` reads the scales
off the attention layers. On other hosts (AVX2) that engine stops at KV-cache setup with
"FP8 KV cache on CPU requires x86 with AVX-512 or AMX", after the weights are loaded; there
the script runs the same engine code up to that point (the CPU worker's init_device and
load_model under the same EngineArgs) and reads the scales from the worker's model.
"""

import json
import os
import subprocess
import sys

import pytest

from maia_serving.tools.calibrate_kv import SIDECAR, calibrate_kv
from maia_serving.tools.training.tokenizer import stdlib_files

pytestmark = pytest.mark.e2e

# A module, not a script: llm.apply_model pickles attention_scales by reference, which
# only resolves in the engine's processes for a function of an importable module.
PROBE = """
import json, sys
import torch


def attention_scales(model):
    from vllm.model_executor.layers.attention import Attention

    return {name: [m._k_scale_float, m._v_scale_float, m.kv_cache_dtype]
            for name, m in model.named_modules() if isinstance(m, Attention)}


def engine_args(path, kv_cache_dtype):
    return dict(model=path, kv_cache_dtype=kv_cache_dtype, max_model_len=256, enforce_eager=True)


def full_engine(path, kv_cache_dtype):
    from vllm import LLM

    return LLM(**engine_args(path, kv_cache_dtype)).apply_model(attention_scales)[0]


def cpu_worker(path, kv_cache_dtype):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.network_utils import get_distributed_init_method, get_open_port
    from vllm.v1.worker.cpu_worker import CPUWorker

    config = EngineArgs(**engine_args(path, kv_cache_dtype)).create_engine_config()
    with set_current_vllm_config(config):
        worker = CPUWorker(config, local_rank=0, rank=0, is_driver_worker=True,
                           distributed_init_method=get_distributed_init_method("127.0.0.1", get_open_port()))
        worker.init_device()
        worker.load_model()
    return attention_scales(worker.model_runner.model)


def main():
    from vllm.platforms import current_platform

    path, kv_cache_dtype = sys.argv[1], sys.argv[2]
    fp8_attention = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()
    how = full_engine if fp8_attention or kv_cache_dtype == "auto" else cpu_worker
    scales = how(path, kv_cache_dtype)
    print("RESULT " + json.dumps({"platform": current_platform.device_name, "how": how.__name__,
                                  "scales": scales}))
"""


def stock_vllm_scales(model, kv_cache_dtype, tmp_path) -> dict:
    (tmp_path / "stock_vllm_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIA_SERVING_")}
    env.update(
        VLLM_CPU_CI_ENV="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
    )
    out = subprocess.run(
        [sys.executable, "-c", "import stock_vllm_probe; stock_vllm_probe.main()", str(model), kv_cache_dtype],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_stock_vllm_loads_calibrated_per_tensor_scales(demo_model, tmp_path):
    data = tmp_path / "calibration.txt"
    data.write_text("".join(p.read_text() for p in stdlib_files(3)))
    out = tmp_path / "calibrated"
    calibrate_kv(demo_model, [data], out, max_tokens=2048, progress=False)
    written = json.loads((out / SIDECAR).read_text())["per_tensor"]

    result = stock_vllm_scales(out, "fp8", tmp_path)

    assert result["platform"] == "cpu"  # vLLM's own platform, not maia
    loaded = {name.split(".")[2]: value for name, value in result["scales"].items()}
    assert loaded == {i: [s["k"], s["v"], "fp8"] for i, s in written.items()}
    assert all(s["k"] != 1.0 and s["v"] != 1.0 for s in written.values())
