"""SGLang on --device maia beyond what test_serve.py checks on both engines: the FP8 KV
cache with its scales (checkpoint, scales file, per-head, none), offline Engine use, and
the platform staying out of the way when it is not asked for."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.utils.e2e import assert_streams
from tests.utils.greedy_reference import PROMPTS, assert_computes_the_checkpoint
from tests.utils.launch import child_env, scrape, sglang_python

OFFLINE = Path(__file__).with_name("sglang_offline.py")


def run_offline(model, kwargs: dict | None = None, env: dict | None = None) -> tuple[dict, str]:
    """Offline Engine in the SGLang venv; returns its greedy texts and ids, and the engine's log."""
    proc = subprocess.run(
        [str(sglang_python()), str(OFFLINE), str(model), json.dumps(PROMPTS), json.dumps(kwargs or {})],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(env),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(result.removeprefix("RESULT ")), log


@pytest.fixture(scope="module")
def fp8_client(sglang_fp8_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{sglang_fp8_server.url}/v1", api_key="none", max_retries=0)


def test_fp8_completion_chat_and_stream(fp8_client):
    client = fp8_client
    out = client.completions.create(model="demo-fp8", prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert out.usage.completion_tokens == 10
    chat = client.chat.completions.create(
        model="demo-fp8", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.usage.completion_tokens == 6
    assert_streams(client, "demo-fp8")


def test_fp8_applies_the_checkpoint_scales(sglang_fp8_server, fp8_client, calibrated_demo):
    fp8_client.completions.create(model="demo-fp8", prompt="x", max_tokens=2)
    log = sglang_fp8_server.log_text()
    k, v = calibrated_demo[1].per_tensor()[0]
    assert f"Maia KV cache fp8_e4m3: per_tensor scales, layer 0: k={k:.4g} v={v:.4g}" in log
    assert "no calibrated KV-cache scales" not in log


def test_fp8_kv_pool_holds_twice_the_tokens(sglang_fp8_server, fp8_client, sglang_server, sglang_client):
    """Same profile, same host budget: twice the tokens, emulated and allocated."""
    sglang_client.completions.create(model="demo", prompt="x", max_tokens=2)
    fp8_client.completions.create(model="demo-fp8", prompt="x", max_tokens=2)
    time.sleep(0.2)
    bf16, fp8 = scrape(sglang_server.url), scrape(sglang_fp8_server.url)
    for holder in ("emulated", "engine"):
        key = f'maia:kv_cache_tokens{{holder="{holder}"}}'
        assert fp8[key] >= 2 * bf16[key] - 16, holder
    assert 'kv_cache_dtype="fp8_e4m3"' in next(k for k in fp8 if k.startswith("maia:device_info{"))


def test_offline_engine_at_tp2_on_maia_without_any_environment(demo_model):
    """`sglang.Engine(device="maia")` with no MAIA_SERVING_* setting but the log's: two ranks on the host's two
    cores (SGLang binds one each), two emulated chips of the default profile, its steps charged, and its greedy
    tokens what the checkpoint computes (tests/utils/greedy_reference.py)."""
    from transformers import AutoTokenizer

    offline, log = run_offline(
        demo_model, {"tp_size": 2}, env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "MAIA_SERVING_LOG_INTERVAL_S": "0"}
    )
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    got = [(tokenizer(prompt)["input_ids"], ids) for prompt, ids in zip(PROMPTS, offline["ids"])]
    assert_computes_the_checkpoint(got, demo_model)
    assert "Maia KV cache: emulated maia200 holds" in log  # the default profile
    assert "Maia emulation [maia200]" in log  # steps were charged: startup alone does not print it


def test_offline_fp8_without_scales_warns_loudly(demo_model):
    offline, log = run_offline(demo_model, {"kv_cache_dtype": "fp8_e5m2"})
    assert all(offline["texts"])
    assert "no calibrated KV-cache scales" in log and "maia-serving calibrate-kv --model" in log
    assert "Maia KV cache fp8_e5m2: default 1.0 scales" in log or "per_tensor scales, layer 0: k=1 v=1" in log


def test_offline_fp8_with_sglang_scales_file(demo_model, calibrated_demo):
    """The original model plus the scales file that calibrate-kv wrote beside its output."""
    calibrated, result = calibrated_demo
    offline, log = run_offline(
        demo_model, {"kv_cache_dtype": "fp8_e4m3", "quantization_param_path": str(calibrated / "kv_cache_scales.json")}
    )
    assert all(offline["texts"])
    k, v = result.per_tensor()[0]
    # SGLang's scales file holds one scale per layer for K and V alike: the larger one.
    assert f"per_tensor scales, layer 0: k={max(k, v):.4g} v={max(k, v):.4g}" in log


def test_offline_fp8_per_head_scales(calibrated_demo):
    model, result = calibrated_demo
    offline, log = run_offline(model, {"kv_cache_dtype": "fp8_e4m3"}, env={"MAIA_SERVING_KV_SCALES": "per_head"})
    assert all(offline["texts"])
    heads = ",".join(f"{x:.4g}" for x in result.k_scale[0].tolist())
    assert f"Maia KV cache fp8_e4m3: per_head scales, layer 0: k={heads} " in log
