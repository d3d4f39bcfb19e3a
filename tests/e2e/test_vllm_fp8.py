"""`vllm serve <calibrated demo> --device maia --kv-cache-dtype fp8` end to end."""

import pytest

from tests.utils.e2e import assert_streams
from tests.utils.launch import scrape


@pytest.fixture(scope="module")
def fp8_client(vllm_fp8_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{vllm_fp8_server.url}/v1", api_key="none", max_retries=0)


def test_fp8_completion_chat_and_stream(fp8_client):
    out = fp8_client.completions.create(model="demo-fp8", prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert out.usage.completion_tokens == 10
    chat = fp8_client.chat.completions.create(
        model="demo-fp8", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.usage.completion_tokens == 6
    assert_streams(fp8_client, "demo-fp8")


def test_fp8_uses_the_calibrated_scales_and_the_maia_backend(vllm_fp8_server, fp8_client, calibrated_demo):
    """The backend logs what it quantizes layer 0 with: the calibrated scales, not 1.0."""
    fp8_client.completions.create(model="demo-fp8", prompt="x", max_tokens=2)
    log = vllm_fp8_server.log_text()
    k, v = calibrated_demo[1].per_tensor()[0]
    assert f"Maia KV cache fp8: per_tensor scales, layer 0: k={k:.4g} v={v:.4g}" in log
    assert "no calibrated KV-cache scales" not in log
    assert "Maia attention backend: maia_serving.vllm.attention.MaiaAttentionBackend" in log


def test_fp8_kv_cache_holds_twice_the_tokens(vllm_fp8_server, fp8_client, maia_server, client):
    """Same profile (maia100), same host budget: twice the blocks, emulated and allocated."""
    client.completions.create(model="demo", prompt="x", max_tokens=2)
    fp8_client.completions.create(model="demo-fp8", prompt="x", max_tokens=2)
    bf16, fp8 = scrape(maia_server.url), scrape(vllm_fp8_server.url)
    for holder in ("emulated", "engine"):
        key = f'maia:kv_cache_blocks{{holder="{holder}"}}'
        assert fp8[key] >= 2 * bf16[key] - 1, holder
    info = 'maia:device_info{kv_cache_dtype="fp8",model="demo-fp8",profile="maia100",tensor_parallel_size="1"}'
    assert fp8[info] == 1
