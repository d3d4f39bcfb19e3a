"""Block-scaled KV caches (MXFP4, MXFP8) served through the OpenAI API on both engines.

Users select them as each engine's users would: `vllm serve --device maia --kv-cache-dtype mxfp4`
(the platform adds the names to vLLM's flag); SGLang's own `--kv-cache-dtype mxfp8`, and
MAIA_SERVING_KV_CACHE_DTYPE for the formats SGLang's flag cannot name. Against the BF16 servers
of the same profile and limits, the engine and the emulated device hold the tokens the format's
bytes allow (MXFP4 at the demo's head_dim 32: 17 bytes a head row against 64).
"""

import json

import pytest

from maia_serving.ops.mx import head_bytes
from tests.utils.e2e import LOGS, SGLANG_ENV, SGLANG_LIMITS, VLLM_LIMITS, assert_streams, openai_client
from tests.utils.launch import Server, free_port, metric, scrape, sglang_serve_cmd, vllm_serve_cmd

CASES = [("vllm", "mxfp4"), ("vllm", "mxfp8"), ("sglang", "mxfp4"), ("sglang", "mxfp8")]


def _cmd(engine: str, fmt: str, model, port: int) -> tuple[list[str], dict[str, str]]:
    if engine == "vllm":
        return vllm_serve_cmd(
            model,
            port,
            "--served-model-name",
            "demo",
            *VLLM_LIMITS,
            "--enforce-eager",
            "--kv-cache-dtype",
            fmt,
            "--additional-config",
            '{"maia_profile": "maia100"}',
        ), {"VLLM_CPU_CI_ENV": "1"}
    common = (model, port, "--served-model-name", "demo", *SGLANG_LIMITS, "--enable-metrics")
    if fmt == "mxfp8":  # a name SGLang's own flag accepts
        return sglang_serve_cmd(*common, "--kv-cache-dtype", fmt), dict(SGLANG_ENV)
    return sglang_serve_cmd(*common), {**SGLANG_ENV, "MAIA_SERVING_KV_CACHE_DTYPE": fmt}


@pytest.fixture(scope="module", params=CASES, ids=[f"{e}-{f}" for e, f in CASES])
def mx_served(request, demo_model):
    engine, fmt = request.param
    port = free_port()
    cmd, env = _cmd(engine, fmt, demo_model, port)
    with Server(cmd, port, LOGS / f"maia-{engine}-{fmt}-server.log", env=env) as server:
        yield engine, fmt, server


def test_mx_cache_answers_completion_chat_and_stream(mx_served):
    _, _, server = mx_served
    client = openai_client(server)
    out = client.completions.create(
        model="demo", prompt="def add(a, b):", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 10
    chat = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 6
    assert_streams(client, "demo")
    # A second, longer request reads the pages the first ones wrote (prefix and decode).
    again = client.completions.create(model="demo", prompt="def add(a, b):" * 20, max_tokens=8, temperature=0)
    assert again.choices[0].text is not None


def test_mx_cache_is_the_format_in_log_and_metrics(mx_served):
    engine, fmt, server = mx_served
    openai_client(server).completions.create(model="demo", prompt="x", max_tokens=2)
    log = server.log_text()
    assert f"Maia KV cache: {fmt} (MAIA_SERVING_KV_CACHE_DTYPE), stored as packed bytes" in log
    info = metric(scrape(server.url), "maia:device_info", kv_cache_dtype=fmt, profile="maia100")
    assert info == 1, engine


def test_mx_cache_holds_the_tokens_its_bytes_allow(mx_served, demo_model, request):
    """Same profile and host budget as the BF16 server: tokens in the ratio of the row sizes."""
    engine, fmt, server = mx_served
    bf16_server = request.getfixturevalue("maia_server" if engine == "vllm" else "sglang_server")
    head_dim = json.loads((demo_model / "config.json").read_text())["head_dim"]
    ratio = 2 * head_dim / head_bytes(fmt, head_dim)
    mx, bf16 = scrape(server.url), scrape(bf16_server.url)
    for holder in ("emulated", "engine"):
        tokens = metric(mx, "maia:kv_cache_tokens", holder=holder)
        base = metric(bf16, "maia:kv_cache_tokens", holder=holder)
        assert tokens == pytest.approx(base * ratio, rel=0.01), (engine, holder)


def test_a_qat_checkpoint_serves_with_its_format(demo_model, tmp_path_factory):
    """`qat-kv` writes a plain checkpoint: SGLang serves it with the MXFP4 cache it was trained for
    (vLLM does in benchmarks/kv_accuracy.py)."""
    from maia_serving.tools.training.qat import QatConfig, qat_kv
    from maia_serving.tools.training.tokenizer import stdlib_files

    out = tmp_path_factory.mktemp("qat") / "demo-qat-mxfp4"
    cfg = QatConfig(fmt="mxfp4", steps=2, batch_size=2, seq_len=64, save_every=2, eval_windows=2, warmup_steps=1)
    qat_kv(demo_model, stdlib_files(2), out, cfg, progress=False)
    port = free_port()
    cmd = sglang_serve_cmd(out, port, "--served-model-name", "demo-qat", *SGLANG_LIMITS)
    env = {**SGLANG_ENV, "MAIA_SERVING_KV_CACHE_DTYPE": "mxfp4"}
    with Server(cmd, port, LOGS / "maia-sglang-qat-server.log", env=env) as server:
        out = openai_client(server).completions.create(
            model="demo-qat", prompt="def add(a, b):", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 8
        assert "Maia KV cache: mxfp4 (MAIA_SERVING_KV_CACHE_DTYPE)" in server.log_text()
