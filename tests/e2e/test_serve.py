"""Both engines on --device maia (`vllm serve` and SGLang's launch_server), through the
openai client and plain HTTP: the same requests, the same answers expected."""

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.utils.e2e import assert_streams
from tests.utils.launch import scrape, settled_scrape


def test_models_lists_the_served_model(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert models.data[0].max_model_len == 512


def test_completion(served):
    out = served.client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert out.usage.completion_tokens == 12
    assert isinstance(out.choices[0].text, str) and out.choices[0].text


def test_greedy_is_deterministic(served):
    texts = {
        served.client.completions.create(model="demo", prompt="import os\n", max_tokens=8, temperature=0)
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_chat(served):
    out = served.client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Say hi."}], max_tokens=10, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 10


def test_streaming_chat(served):
    """The streamed reply is the plain one, ending with its usage (how many chunks carry text is the server's
    choice)."""
    ask = {"model": "demo", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 8, "temperature": 0}
    body = {"ignore_eos": True}
    plain = served.client.chat.completions.create(**ask, extra_body=body).choices[0].message.content
    chunks = list(
        served.client.chat.completions.create(
            **ask, stream=True, stream_options={"include_usage": True}, extra_body=body
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].usage.completion_tokens == 8


def test_streaming_completion(served):
    assert_streams(served.client, "demo", max_tokens=6)


def test_concurrent_requests(served):
    def one(i: int) -> int:
        out = served.client.completions.create(model="demo", prompt=f"x = {i}\n", max_tokens=16, temperature=0)
        return out.usage.completion_tokens

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(6))) == [16] * 6


def _still_serving(served) -> None:
    """The server answers a whole request: four tokens, greedy and past any end-of-sequence token (sampled at the
    default temperature, the random demo weights drew one within four tokens now and then)."""
    out = served.client.completions.create(
        model="demo", prompt="still there?", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 4


def test_prompt_over_max_model_len_is_400_and_server_keeps_serving(served):
    with pytest.raises(openai.BadRequestError) as err:
        served.client.completions.create(model="demo", prompt="word " * 2000, max_tokens=4)
    assert err.value.status_code == 400
    assert "context length" in str(err.value) or "512" in str(err.value)
    _still_serving(served)


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "demo", "prompt": "x", "max_tokens": "many"}'])
def test_malformed_request_is_4xx_and_server_keeps_serving(served, body):
    req = urllib.request.Request(
        f"{served.server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert 400 <= err.value.code < 500
    _still_serving(served)


def _demo_device(demo_model):
    """The emulated device both servers build for the demo model (maia100, the shared limits)."""
    from maia_serving.emulator.device.session import EmulatedDevice
    from maia_serving.emulator.hardware import load_profile
    from maia_serving.emulator.memory import ServingConfig
    from maia_serving.emulator.model_shape import load_model_shape

    config = ServingConfig(max_model_len=512, max_num_batched_tokens=2048, max_num_seqs=64)
    return EmulatedDevice.fit(load_profile("maia100"), load_model_shape(demo_model), config)


DEVICE_INFO = 'maia:device_info{kv_cache_dtype="auto",model="demo",profile="maia100",tensor_parallel_size="1"}'


def test_metrics_describe_the_device_before_any_request(served, demo_model):
    first = served.server.metrics_at_start
    assert first["maia:hbm_total_bytes"] == 64 * 2**30
    assert first[DEVICE_INFO] == 1
    assert first["maia:hbm_used_bytes"] == _demo_device(demo_model).hbm_used_bytes(0)
    assert first["maia:kv_cache_blocks_used"] == 0


def _settled_scrape(url: str, steps_before: float, expected_steps: int) -> dict[str, float]:
    """/metrics once the request's steps are in (SGLang writes its files after responding)."""
    return settled_scrape(url, lambda after: after["maia:emulated_step_seconds_count"] - steps_before >= expected_steps)


def test_metrics_rise_by_exactly_what_one_request_costs(served, demo_model):
    """One request alone: a prefill and four decodes, priced as the cost model prices them."""
    device = _demo_device(demo_model)
    before = scrape(served.server.url)
    out = served.client.completions.create(
        model="demo", prompt="a b c d e f g h", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 5
    n = out.usage.prompt_tokens
    after = _settled_scrape(served.server.url, before["maia:emulated_step_seconds_count"], 5)
    rise = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = [((n,), (n,))] + [((1,), (n + i,)) for i in range(1, 5)]
    busy = sum(device.cost_model.cost_of(q, c).total_s for q, c in steps)
    assert rise["maia:emulated_step_seconds_count"] == 5
    assert rise["maia:emulated_tokens_total"] == n + 4
    assert rise["maia:emulated_busy_seconds_total"] == pytest.approx(busy, rel=1e-9)
    for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert rise[f"maia:emulated_{name}_seconds_count"] == 1, name
    assert rise["maia:emulated_time_to_first_token_seconds_sum"] == pytest.approx(
        device.cost_model.cost_of((n,), (n,)).total_s, rel=1e-9
    )
    assert after[DEVICE_INFO] == 1
    assert after["maia:kv_cache_blocks_used"] == 0  # the request is done: nothing held
    assert after["maia:hbm_used_bytes"] == device.hbm_used_bytes(0)
    assert after['maia:emulation_errors_total{stage="charge"}'] == 0
    assert after['maia:kv_cache_blocks{holder="emulated"}'] >= after['maia:kv_cache_blocks{holder="engine"}'] > 0


def test_logs_state_kv_sizing_and_emulated_progress(served):
    served.client.completions.create(model="demo", prompt="log me", max_tokens=3)
    time.sleep(1.5)
    served.client.completions.create(model="demo", prompt="log me again", max_tokens=3)
    log = served.server.log_text()
    assert "Maia KV cache: emulated maia100 holds" in log and "so the engine gets" in log
    assert "Maia emulation [maia100]" in log


def test_vllm_health_and_version(maia_server):
    with urllib.request.urlopen(f"{maia_server.url}/version", timeout=10) as resp:
        assert json.loads(resp.read())["version"].startswith("0.32")


def test_sglang_runs_the_maia_attention_backend_on_the_host(sglang_server):
    with urllib.request.urlopen(f"{sglang_server.url}/server_info", timeout=10) as resp:
        info = json.loads(resp.read())
    assert info["attention_backend"] == "maia"
    assert info["device"] == "cpu"  # --device maia runs its tensors on the host
