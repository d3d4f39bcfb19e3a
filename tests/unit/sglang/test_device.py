"""sglang/device.py and the KV pool size: the emulated device from SGLang's server arguments, priced as
the served model or the proxy shape MAIA_SERVING_MODEL names, and the pool in tokens of the served model."""

import json
from types import SimpleNamespace

import pytest

from maia_serving import envs
from maia_serving.emulator.hardware import load_profile
from maia_serving.emulator.memory import ServingConfig, plan_memory
from maia_serving.emulator.model_shape import load_model_shape
from maia_serving.sglang.device import build_device, host_plan
from maia_serving.sglang.platform import _size_kv_pool

DEMO = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def server_args(tmp_path, monkeypatch):
    for name in (envs.MAIA_SERVING_MODEL, envs.MAIA_SERVING_HOST_KV_GIB, envs.MAIA_SERVING_EXPERT_LOAD):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(envs.MAIA_SERVING_PROFILE, "maia200")
    (tmp_path / "config.json").write_text(json.dumps(DEMO))
    return SimpleNamespace(
        model_path=str(tmp_path),
        dtype="auto",
        served_model_name="demo",
        tp_size=1,
        pp_size=1,
        kv_cache_dtype="auto",
        context_length=512,
        mem_fraction_static=None,
        chunked_prefill_size=2048,
        max_prefill_tokens=16384,
        max_running_requests=64,
        max_total_tokens=None,
    )


def test_without_a_proxy_the_served_model_is_priced(server_args):
    device = build_device(server_args)
    assert device.plan.model == host_plan(server_args, device).model == "demo"


def test_the_proxy_is_priced_and_the_pool_holds_the_emulated_tokens(server_args, monkeypatch):
    """Llama-3-70B on a Maia 200 holds fewer tokens than 1 GiB holds of the demo model (512 bytes each):
    the pool gets exactly the emulated device's tokens."""
    monkeypatch.setenv(envs.MAIA_SERVING_MODEL, "llama-3-70b")
    device = build_device(server_args)
    assert (device.plan.model, device.plan.profile, host_plan(server_args, device).model) == (
        "llama-3-70b",
        "maia200",
        "demo",
    )
    _size_kv_pool(server_args)
    config = ServingConfig(max_model_len=512, gpu_memory_utilization=0.92, max_num_batched_tokens=2048, max_num_seqs=64)
    expected = plan_memory(load_model_shape("llama-3-70b"), load_profile("maia200"), config).kv_tokens
    assert server_args.max_total_tokens == expected < 2**30 // 512


def test_the_host_cap_counts_the_served_model_s_bytes(server_args, monkeypatch):
    monkeypatch.setenv(envs.MAIA_SERVING_MODEL, "llama-3-70b")
    monkeypatch.setenv(envs.MAIA_SERVING_HOST_KV_GIB, str(2**20 / 2**30))  # 1 MiB: 2048 tokens of 512 bytes
    _size_kv_pool(server_args)
    assert server_args.max_total_tokens == 2048


def test_an_unknown_proxy_names_the_variable_and_the_choices(server_args, monkeypatch):
    monkeypatch.setenv(envs.MAIA_SERVING_MODEL, "llama-9-9b")
    with pytest.raises(ValueError, match="^MAIA_SERVING_MODEL='llama-9-9b': no model config .* llama-3-70b"):
        build_device(server_args)


def test_the_proxy_is_routed_as_the_expert_load_file_counts(server_args, monkeypatch, tmp_path):
    from maia_serving.serving.priced_model import routing_note

    load = tmp_path / "load.json"
    load.write_text(json.dumps({"source": "a hot expert", "layers": [80, 20, 20, 20, 20, 20, 10, 10]}))
    monkeypatch.setenv(envs.MAIA_SERVING_MODEL, "mixtral-8x7b")
    assert routing_note(build_device(server_args).cost_model.model) is None  # uniform routing: nothing to say
    monkeypatch.setenv(envs.MAIA_SERVING_EXPERT_LOAD, str(load))
    model = build_device(server_args).cost_model.model
    assert model.moe.load.source == "a hot expert"
    assert routing_note(model) == (
        "Maia routing: mixtral-8x7b's MoE layers are priced with the measured expert "
        "load of a hot expert (not uniform routing)."
    )
    load.write_text("[1, 2]")
    with pytest.raises(ValueError, match="^MAIA_SERVING_EXPERT_LOAD='.*load.json': --expert-load .*expected"):
        build_device(server_args)
